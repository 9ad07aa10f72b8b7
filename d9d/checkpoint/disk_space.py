"""Disk space for checkpoints: what one needs, what a device has, and "no space" errors.

A training checkpoint holds every parameter plus AdamW's two moments, all in the
parameter dtype, each tensor once whatever the layout; ``torch.save`` adds about 1.5 KB
per tensor, and the small files (DCP metadata, train state, RNG states, manifest) a few
KB more per tensor and rank. :func:`estimate_checkpoint_bytes` is that sum, read from the
model's shapes alone.

A full disk rarely surfaces as ``ENOSPC``: DCP writes tensors through ``torch.save``,
whose zip writer reports ``unexpected pos ... vs ...`` instead. :func:`no_space_message`
therefore also checks the free space left on the device after a failed write.
"""

import errno
import os
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

# torch.save's per-tensor zip overhead in a DCP file, plus a margin for the per-tensor
# entries of the metadata and optimizer bookkeeping (measured: about 1.6 KB per tensor).
_PER_TENSOR_BYTES = 4096
_FIXED_BYTES = 1 << 20


def estimate_checkpoint_bytes(param_numels: list[int], itemsize: int) -> int:
    """Bytes of one training checkpoint of a model trained with AdamW.

    Args:
        param_numels: Element count of every parameter of the whole model.
        itemsize: Bytes per element of the parameters (and so of AdamW's state).

    Returns:
        Parameters + two moments per parameter + per-tensor and fixed overheads.
    """
    tensors = 3 * len(param_numels)
    return 3 * sum(param_numels) * itemsize + tensors * _PER_TENSOR_BYTES + _FIXED_BYTES


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where its space will come from)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def device_of(path: str | os.PathLike) -> str:
    """The file system holding ``path``: ``"<source> (mounted on <point>)"``."""
    target = os.path.realpath(existing_parent(Path(path)))
    best = ("", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 2:
                    continue
                source, point = parts[0], parts[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[1]):
                    best = (source, point)
    except OSError:
        pass
    if not best[1]:
        return f"the file system of {target}"
    return f"{best[0]} (mounted on {best[1]})"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for an unprivileged writer on the file system of ``path``."""
    return shutil.disk_usage(existing_parent(Path(path))).free


def size_text(n: int) -> str:
    """``n`` bytes as ``"1.23 GB"``, or ``"45.6 MB"`` below 0.1 GB (decimal, as ``df -H``)."""
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def _errors_of(err: BaseException):
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, CheckpointException):
            stack += [failure[0] for failure in current.failures.values()]
        stack += [current.__cause__, current.__context__]


def _is_no_space(err: BaseException) -> bool:
    for e in _errors_of(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
    return False


def no_space_message(err: BaseException, path: Path, need_bytes: int) -> str | None:
    """The one-line "no space" error for a failed write, or ``None`` if it was not that.

    A write failed for lack of space if an ``ENOSPC``/``EDQUOT`` is anywhere in the error
    (DCP wraps each rank's), or if the device now has less than ``need_bytes`` free
    (``torch.save``'s zip writer loses the errno).

    Args:
        err: The exception of the failed write.
        path: What was being written.
        need_bytes: About how much the write needed.
    """
    try:
        short = free_bytes(path) < need_bytes
    except OSError:
        short = False
    if not (_is_no_space(err) or short):
        return None
    return (
        f"no space left on {device_of(path)} writing {path}: need about "
        f"{size_text(need_bytes)}, {size_text(free_bytes(path))} free"
    )
