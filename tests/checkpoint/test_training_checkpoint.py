"""The checkpoint manager: exact round trip, verification, pruning rules, failed saves."""

import errno
import json
import os
import random
import warnings

import pytest
import torch

from d9d.checkpoint.lineage import Lineage
from d9d.checkpoint.manifest import read_manifest
from d9d.checkpoint.training import CheckpointError, CheckpointManager, CheckpointSaveError
from d9d.train.lr import build_lr_scheduler

PARAMS = {"hidden_size": 4}


@pytest.fixture(autouse=True)
def _quiet_dcp():
    # DCP warns that it runs without a process group: that is the point of these tests.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, "cosine", 20, warmup_steps=3)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _save(manager, step, trainer, finite=True):
    model, optimizer, scheduler = trainer
    return manager.save(
        step,
        [model],
        [optimizer],
        scheduler=scheduler,
        data_state={"epoch": step},
        model_params=PARAMS,
        last_step_finite=finite,
    )


def test_round_trip_continues_exactly(tmp_path):
    straight = _trainer()
    for _ in range(3):
        _step(*straight)
    manager = CheckpointManager(tmp_path, keep_last=2)
    path = _save(manager, 3, straight)
    assert path.name == "step-3" and manager.latest() == path
    random.random()  # the RNG states are restored too
    expected_python = random.random()
    for _ in range(3):
        _step(*straight)

    resumed = _trainer(seed=1)  # other weights: all must come from the checkpoint
    model, optimizer, scheduler = resumed
    state = manager.load(path, [model], [optimizer], schedulers=[scheduler], model_params=PARAMS)
    assert state.step == 3 and state.data_state == {"epoch": 3}
    random.random()
    assert random.random() == expected_python
    for _ in range(3):
        _step(*resumed)
    for a, b in zip(straight[0].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == straight[2].get_last_lr()


def test_manifest_lists_every_file_and_the_run(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = _save(manager, 1, _trainer())
    manifest = read_manifest(path)
    on_disk = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", "train_state.json", "rng/rank0.pt"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
    assert manifest["step"] == 1 and manifest["branch"] == "b0"
    assert manifest["run"] == manager.lineage.run and manifest["last_step_finite"] is True
    assert manager.verify(path) == manifest


def test_keep_last_and_tmp_ignored(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    trainer = _trainer()
    for step in (1, 2, 3):
        _save(manager, step, trainer)
    assert [p.name for p in manager.complete_checkpoints()] == ["step-2", "step-3"]
    # A save that crashed before its rename leaves only a .tmp folder: never resumed from.
    (tmp_path / "step-9.tmp").mkdir()
    assert manager.latest().name == "step-3"
    _save(manager, 4, trainer)
    assert not (tmp_path / "step-9.tmp").exists()


def _flip_payload_bytes(path, count=64):
    # Same size, other contents: only a checksum can tell.
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_flipped_payload_bytes_are_refused_naming_the_file_and_the_newest_verified(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    trainer = _trainer()
    _save(manager, 1, trainer)
    _save(manager, 2, trainer)
    latest = _save(manager, 3, trainer)
    _flip_payload_bytes(tmp_path / "step-2")
    shard = _flip_payload_bytes(latest)
    model, optimizer, _ = _trainer(seed=5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError) as err:
        manager.load(latest, [model], [optimizer])
    message = str(err.value)
    assert f"{shard} has CRC-32" in message and "the manifest records" in message
    # step-2 is corrupted too: the hint skips it.
    assert f"the newest verified checkpoint is {tmp_path / 'step-1'}" in message
    assert f"checkpoint.resume_from={tmp_path / 'step-1'}" in message
    # Nothing was read into the model.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_truncated_files_are_refused_naming_them(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    trainer = _trainer()
    _save(manager, 1, trainer)
    latest = _save(manager, 2, trainer)
    rng = latest / "rng" / "rank0.pt"
    size = rng.stat().st_size
    rng.write_bytes(rng.read_bytes()[:100])
    model, optimizer, _ = _trainer()
    with pytest.raises(
        CheckpointError,
        match=rf"{rng} has 100 bytes, the manifest records {size}; the newest verified "
        rf"checkpoint is {tmp_path / 'step-1'}",
    ):
        manager.load(latest, [model], [optimizer])
    (latest / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"rank0\.pt has 100 bytes.* \(and 1 more\)"):
        manager.verify(latest)
    (latest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing \(the save never"):
        manager.verify(latest)


def test_incompatible_model_refused(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = _save(manager, 1, _trainer())
    model, optimizer, _ = _trainer()
    with pytest.raises(CheckpointError, match="incompatible model: hidden_size: checkpoint 4, "):
        manager.load(path, [model], [optimizer], model_params={"hidden_size": 8})
    with pytest.raises(ValueError, match="one optimizer per stage module"):
        manager.load(path, [model], [])


def test_a_save_never_prunes_the_last_finite_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    trainer = _trainer()
    _save(manager, 1, trainer)
    _save(manager, 2, trainer)
    for step in (3, 4, 5):  # non-finite norms: their optimizer steps were skipped
        _save(manager, step, trainer, finite=False)
    assert [p.name for p in manager.complete_checkpoints()] == ["step-2", "step-4", "step-5"]
    _save(manager, 6, trainer)
    assert [p.name for p in manager.complete_checkpoints()] == ["step-5", "step-6"]


def test_pruning_keeps_other_branches_and_runs(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    trainer = _trainer()
    _save(manager, 4, trainer)
    _save(manager, 8, trainer)  # prunes step-4 (same branch)
    _save(manager, 12, trainer)
    assert [p.name for p in manager.complete_checkpoints()] == ["step-12"]
    # A new branch from step-12's history...
    lineage = manager.lineage
    branch = lineage.fork("b0", 12)
    lineage.live = branch
    for step in (13, 14):
        _save(manager, step, trainer)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step-12", "step-14.b1"]
    # ... and another run's checkpoint in the folder are never pruned.
    other = CheckpointManager(tmp_path, keep_last=1)
    other.lineage = Lineage.new()
    other.lineage.live = "b0"
    _save(other, 20, trainer)
    _save(manager, 15, trainer)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step-12", "step-15.b1", "step-20"]


def test_enospc_during_a_save_removes_the_tmp_and_keeps_the_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.estimate_bytes = 3 * 10**9
    trainer = _trainer()
    first = _save(manager, 1, trainer)
    real_fsync = os.fsync

    def full_disk(fd):
        # Delayed allocation reports a full disk at fsync, inside DCP's writer.
        if "step-2.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointSaveError) as err:
        _save(manager, 2, trainer)
    message = str(err.value)
    assert message.startswith("no space left on ")
    assert f"writing {tmp_path / 'step-2.tmp'}: need about 3.00 GB" in message
    assert f"{tmp_path / 'step-2.tmp'} was removed" in message
    assert f"the newest complete checkpoint is {first} is intact" in message
    assert "\n" not in message
    assert not (tmp_path / "step-2.tmp").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert manager.latest() == first
    manager.verify(first)


def test_a_background_save_writes_the_same_checkpoint(tmp_path):
    trainer = _trainer()
    for _ in range(2):
        _step(*trainer)
    sync = _save(CheckpointManager(tmp_path / "sync"), 2, trainer)
    background = CheckpointManager(tmp_path / "async", async_save=True)
    path = _save(background, 2, trainer)
    # Training goes on while the write runs: the staged copy is what gets written.
    _step(*trainer)
    assert background.wait() == path
    background.close()
    synced, written = read_manifest(sync)["files"], read_manifest(path)["files"]
    assert synced.keys() == written.keys()
    for name in ("train_state.json", "rng/rank0.pt"):
        assert synced[name]["size"] == written[name]["size"]
    model, optimizer, _ = _trainer(seed=3)
    CheckpointManager(tmp_path / "sync").load(sync, [model], [optimizer])
    expected = [p.detach().clone() for p in model.parameters()]
    background.load(path, [model], [optimizer])
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters(), strict=True))
    assert json.loads((path / "train_state.json").read_text())["step"] == 2
