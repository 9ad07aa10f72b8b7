"""A real full disk: a small tmpfs (needs the right to mount; the injected-ENOSPC tests in
``test_training_checkpoint.py`` and ``tests/train/test_checkpoint_rules.py`` run everywhere).
"""

import shutil
import subprocess
import warnings

import pytest
import torch

from d9d.checkpoint.disk_space import estimate_checkpoint_bytes
from d9d.checkpoint.training import CheckpointManager, CheckpointSaveError


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_keeps_the_last_good_checkpoint(small_disk):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    folder = small_disk / "checkpoints"
    manager = CheckpointManager(folder, keep_last=1)
    manager.estimate_bytes = estimate_checkpoint_bytes([p.numel() for p in model.parameters()], 4)

    def save(step):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return manager.save(
                step, [model], [optimizer], scheduler=None, data_state={}, model_params={}
            )

    first = save(1)  # about 0.8 MB
    # Leave less room than one more checkpoint needs.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 300_000))
    with pytest.raises(CheckpointSaveError) as err:
        save(2)
    message = str(err.value)
    assert message.startswith(f"no space left on tmpfs (mounted on {small_disk}) writing ")
    assert f"{folder}/step-2.tmp: need about 1.9 MB" in message
    assert f"the newest complete checkpoint is {first} is intact" in message
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]
    manager.verify(first)
