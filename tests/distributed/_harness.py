"""Runs test scenarios in spawned CPU processes joined by a gloo process group.

Each worker initialises the default group through a ``file://`` rendezvous in a fresh
temporary directory (no TCP port, so concurrent test runs cannot collide), runs one
scenario function and writes its JSON-able result to ``rank<r>.json``.
"""

import datetime
import importlib
import json
import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A hung collective (one rank failed) must fail the test, not stall the suite.
_PG_TIMEOUT = datetime.timedelta(seconds=240)


def _worker(rank: int, world_size: int, workdir: str, target: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=_PG_TIMEOUT,
    )
    module_name, fn_name = target.rsplit(":", 1)
    fn = getattr(importlib.import_module(module_name), fn_name)
    try:
        result = fn(workdir=workdir, **kwargs)
    except Exception:
        Path(workdir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_spawned(world_size: int, target: str, **kwargs) -> list[dict]:
    """Runs ``target`` (``"module:function"``) on ``world_size`` gloo ranks.

    The function is called as ``fn(workdir=..., **kwargs)`` on every rank and returns a
    JSON-able dict.

    Returns:
        The per-rank results, in rank order.

    Raises:
        RuntimeError: With the failing ranks' tracebacks if any rank raised.
    """
    with tempfile.TemporaryDirectory(prefix="d9d_dist_") as workdir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, workdir, target, kwargs),
                nprocs=world_size,
                start_method="spawn",
                join=True,
            )
        except Exception as err:
            errors = sorted(Path(workdir).glob("rank*.error"))
            details = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in errors)
            raise RuntimeError(f"spawned ranks failed:\n{details}") from err
        return [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world_size)]


def fresh_subdir(workdir: str, name: str) -> str:
    """Returns ``workdir/name``, created (for checkpoints shared by all ranks)."""
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return path
