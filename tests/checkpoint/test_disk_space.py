"""Checkpoint sizes, free space and the "no space left" message."""

import errno
import warnings

import torch
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from d9d.checkpoint.disk_space import device_of, estimate_checkpoint_bytes, no_space_message
from d9d.checkpoint.training import CheckpointManager


def test_estimate_bounds_a_real_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        path = CheckpointManager(tmp_path).save(
            1, [model], [optimizer], scheduler=None, data_state={}, model_params={}
        )
    actual = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    numels = [p.numel() for p in model.parameters()]
    estimate = estimate_checkpoint_bytes(numels, 4)
    tensor_bytes = 3 * sum(numels) * 4
    # Tensor bytes dominate; the estimate adds overheads the real files stay under.
    assert tensor_bytes < actual <= estimate
    assert estimate - actual < (1 << 20) + 12 * 4096


def test_device_names_a_mount():
    assert "(mounted on /" in device_of("/proc/self")


def _chained(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("writing failed") from cause
    except RuntimeError as err:
        return err


def test_no_space_is_found_wherever_dcp_put_it(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = CheckpointException("save failed", {0: _wrap_exception(full)})
    for err in (full, wrapped, _chained(full)):
        message = no_space_message(err, tmp_path / "step-2.tmp", 2 * 10**9)
        assert message.startswith("no space left on ")
        assert f"writing {tmp_path / 'step-2.tmp'}: need about 2.00 GB" in message
    # torch.save's zip writer loses the errno: the free space decides.
    zip_error = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    )
    assert no_space_message(zip_error, tmp_path, 10**18) is not None
    assert no_space_message(zip_error, tmp_path, 1) is None
