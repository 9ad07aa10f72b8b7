"""Checkpoint scenarios of the training loop, run on spawned gloo ranks.

Each scenario trains the tiny test model of ``_loop_scenarios`` with ``Trainer`` in-process
and returns what its test asserts: refusal messages, folder listings, per-step losses and
learning rates. ``one_process`` holds the cases where the layout does not matter;
``two_ranks`` those where it does (files written by both ranks, collective verification,
a background save on its own process group, branches, the HF export by rank 0).
"""

import contextlib
import errno
import io
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.train.config import load_train_config
from tests.helpers import guarded
from tests.train._loop_scenarios import LAYOUTS, overrides


def _trainer(items: dict, log: list | None = None):
    from d9d.train.loop import Trainer

    sink = log.append if log is not None else (lambda _m: None)
    return Trainer(load_train_config(None, items), log=sink)


def _run(items: dict, log: list | None = None) -> tuple:
    trainer = _trainer(items, log)
    return trainer, trainer.run()


def _refused(items: dict) -> str | None:
    try:
        _trainer(items)
    except ValueError as err:
        return str(err)
    return None


def _steps(path: Path) -> list:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _losses(path: Path) -> list:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _is_main() -> bool:
    return dist.get_rank() == 0


def _barrier() -> None:
    dist.barrier()


# --- one process -----------------------------------------------------------------------


def _corruption(base: dict) -> dict:
    items = {**base, "steps": 8, "checkpoint.interval": 4, "checkpoint.keep_last": 2}
    _run(items)
    folder = Path(base["output_dir"]) / "checkpoints"
    shard = folder / "step-8" / "__0_0.distcp"
    _flip_bytes(shard)
    return {"message": _refused(items), "shard": str(shard), "previous": str(folder / "step-4")}


def _settings(base: dict) -> dict:
    from d9d.train.lr import LrMultiplier

    items = {**base, "steps": 6, "checkpoint.save_final": True}
    _run(items)
    refusals = {
        "steps": _refused({**items, "steps": 10}),
        "lr": _refused({**items, "optimizer.lr": 1e-3}),
        "schedule": _refused({**items, "lr.schedule": "constant"}),
        "seq_len": _refused({**items, "data.seq_len": 16}),
    }
    log: list = []
    changed = {**items, "steps": 10, "optimizer.lr": 1e-3, "checkpoint.allow_changes": True}
    trainer, history = _run(changed, log)
    fresh = LrMultiplier("cosine", 10, 3, 0.1)
    folder = Path(base["output_dir"]) / "checkpoints"
    constant = {
        **items,
        "steps": 8,
        "lr.schedule": "constant",
        "checkpoint.allow_changes": True,
        "checkpoint.resume_from": str(folder / "step-6"),
    }
    _, constant_history = _run(constant)
    return {
        "refusals": refusals,
        "log": log,
        "lrs": [m.lr for m in history],
        "fresh_lrs": [1e-3 * fresh(s) for s in range(6, 10)],
        "constant_lrs": [m.lr for m in constant_history],
        "betas": list(trainer.optimizers[0].param_groups[0]["betas"]),
    }


def _old_run(base: dict) -> dict:
    old = {**base, "steps": 8, "checkpoint.interval": 4}
    _run(old)
    new = {**old, "steps": 4, "checkpoint.interval": 2, "checkpoint.resume": False}
    refusal = _refused(new)
    out = Path(base["output_dir"])
    untouched = _listing(out / "checkpoints")
    log: list = []
    _run({**new, "checkpoint.overwrite": True}, log)
    (replaced,) = (out / "checkpoints").glob("replaced-*")
    (old_metrics,) = out.glob("metrics.replaced-*.jsonl")
    missing = out / "checkpoints" / "step-99"
    return {
        "missing": _refused({**old, "checkpoint.resume_from": str(missing)}),
        "missing_path": str(missing),
        "refusal": refusal,
        "untouched": untouched,
        "folder": str(out / "checkpoints"),
        "after": _listing(out / "checkpoints"),
        "replaced": _listing(replaced),
        "metrics": _steps(out / "metrics.jsonl"),
        "old_metrics": _steps(old_metrics),
        "log": log,
    }


def _rollback(base: dict) -> dict:
    items = {**base, "steps": 12, "checkpoint.interval": 4, "checkpoint.keep_last": 3}
    _, straight = _run(items)
    out = Path(base["output_dir"])
    folder = out / "checkpoints"
    fork = {
        **items,
        "steps": 8,  # stopped (as if killed) right after its step-8 save
        "clip.max_norm": 0.25,
        "checkpoint.allow_changes": True,
        "checkpoint.resume_from": str(folder / "step-4"),
    }
    fork_log: list = []
    _, forked = _run(fork, fork_log)
    after_fork = _listing(folder)
    restart = {**items, "clip.max_norm": 0.25, "checkpoint.allow_changes": True}
    restart_log: list = []
    _, restarted = _run(restart, restart_log)
    return {
        "straight": [m.loss for m in straight],
        "forked": [m.loss for m in forked],
        "restarted": [m.loss for m in restarted],
        "after_fork": after_fork,
        "after_restart": _listing(folder),
        "fork_log": fork_log,
        "restart_log": restart_log,
        "metrics_steps": _steps(out / "metrics.jsonl"),
        "metrics_losses": _losses(out / "metrics.jsonl"),
        "b0_steps": _steps(out / "metrics.b0.jsonl"),
        "b0_losses": _losses(out / "metrics.b0.jsonl"),
        "folder": str(folder),
    }


def _preflight(base: dict, workdir: str) -> dict:
    import d9d.train.preflight as preflight

    a_file = Path(workdir) / "a_file"
    a_file.write_text("not a folder")
    out = Path(base["output_dir"])
    results = {
        "checkpoint_file": _refused({**base, "checkpoint.folder": str(a_file)}),
        "checkpoint_proc": _refused({**base, "checkpoint.folder": "/proc/d9d-checkpoints"}),
        "output_file": _refused({**base, "output_dir": str(a_file)}),
        "output_under_file": _refused({**base, "output_dir": str(a_file / "run")}),
        "trained": (out / "metrics.jsonl").exists(),
    }
    real = preflight.free_bytes
    preflight.free_bytes = lambda _path: 1000
    try:
        results["no_space"] = _refused({**base, "checkpoint.save_final": True})
    finally:
        preflight.free_bytes = real
    results["folder"] = str(out / "checkpoints")
    return results


def _enospc(base: dict) -> dict:
    from d9d.train.stop import RunStopped

    items = {**base, "steps": 3, "checkpoint.interval": 1}
    real_fsync = os.fsync

    def full_disk(fd):
        # A full disk reported by fsync inside DCP's writer (delayed allocation).
        if "step-2.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.fsync = full_disk
    try:
        _run(items)
        message = None
    except RunStopped as err:
        message = str(err)
    finally:
        os.fsync = real_fsync
    folder = Path(base["output_dir"]) / "checkpoints"
    after = _listing(folder)
    log: list = []
    _run(items, log)
    return {"message": message, "after": after, "resumed": log, "folder": str(folder)}


def _poison_from(trainer, first_bad_step: int) -> None:
    original = trainer.schedule.step

    def poisoned(batch):
        result = original(batch)
        if trainer.step + 1 >= first_bad_step:
            for param in trainer.stages.parameters():
                param.grad.fill_(float("nan"))
        return result

    trainer.schedule.step = poisoned


def _nonfinite(base: dict) -> dict:
    from d9d.train.stop import RunStopped

    items = {
        **base,
        "steps": 10,
        "checkpoint.interval": 1,
        "checkpoint.keep_last": 2,
        "clip.max_consecutive_nonfinite": 3,
    }
    trainer = _trainer(items)
    _poison_from(trainer, 4)
    try:
        trainer.run()
        message, code = None, None
    except RunStopped as err:
        message, code = str(err), err.exit_code
    folder = Path(base["output_dir"]) / "checkpoints"
    return {"message": message, "code": code, "left": _listing(folder), "folder": str(folder)}


def _cli(argv: list[str], patch=None) -> dict:
    # python -m d9d.train's main(), in this process (so that a test can poison it).
    from d9d.train import __main__ as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        if patch is not None:
            patch()
        code = cli.main(argv)
    return {"code": code, "stderr": err.getvalue()}


def _cli_nonfinite(base: dict) -> dict:
    from d9d.train import loop
    from tests.train._loop_scenarios import set_items

    items = {**base, "steps": 6, "clip.max_consecutive_nonfinite": 2}
    original = loop.Trainer.train_step

    def poisoned(self):
        if not getattr(self, "_poisoned", False):
            self._poisoned = True
            _poison_from(self, 1)
        return original(self)

    loop.Trainer.train_step = poisoned
    try:
        argv = [arg for item in set_items(items) for arg in ("--set", item)]
        return _cli(argv)
    finally:
        loop.Trainer.train_step = original


def _cli_sigterm_async(base: dict) -> dict:
    from tests.train._loop_scenarios import set_items

    items = {
        **base,
        "steps": 8,
        "checkpoint.interval": 2,
        "checkpoint.async_save": True,
        "checkpoint.kill_during_save": 4,
        "checkpoint.kill_signal": "SIGTERM",
    }
    argv = [arg for item in set_items(items) for arg in ("--set", item)]
    result = _cli(argv)
    folder = Path(base["output_dir"]) / "checkpoints"
    result["left"] = _listing(folder)
    result["folder"] = str(folder)
    result["metrics"] = _steps(Path(base["output_dir"]) / "metrics.jsonl")
    return result


def _tails(base: dict) -> dict:
    items = {**base, "steps": 2, "checkpoint.save_final": True}
    _run(items)
    out = Path(base["output_dir"])
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # the run was killed while writing this line
    log: list = []
    _run({**items, "steps": 3, "checkpoint.allow_changes": True}, log)
    metrics = _steps(out / "metrics.jsonl")
    # A truncated RNG file in the newest checkpoint.
    rng = out / "checkpoints" / "step-3" / "rng" / "rank0.pt"
    rng.write_bytes(rng.read_bytes()[:64])
    return {
        "log": log,
        "metrics": metrics,
        "rng": str(rng),
        "rng_refusal": _refused({**items, "steps": 3}),
        "previous": str(out / "checkpoints" / "step-2"),
    }


def _async_matches_sync(base: dict) -> dict:
    items = {**base, "steps": 6, "checkpoint.interval": 2}
    sync, sync_history = _run({**items, "output_dir": base["output_dir"] + "_sync"})
    log: list = []
    background, async_history = _run({**items, "checkpoint.async_save": True}, log)
    same_params = all(
        torch.equal(a.detach(), b.detach())
        for a, b in zip(sync.stages.parameters(), background.stages.parameters(), strict=True)
    )
    records = [
        json.loads(line)
        for line in (Path(base["output_dir"]) / "checkpoints.jsonl").read_text().splitlines()
    ]
    return {
        "sync": [m.loss for m in sync_history],
        "async": [m.loss for m in async_history],
        "same_params": same_params,
        "saved": [line for line in log if line.startswith("saved")],
        "records": records,
        "left": _listing(Path(base["output_dir"]) / "checkpoints"),
    }


def one_process(workdir: str, corpus: str) -> dict:
    """Every single-process checkpoint scenario (one spawned rank)."""

    def base(name: str) -> dict:
        return overrides(Path(corpus), Path(workdir) / name)

    return {
        "corruption": guarded(_corruption, base("corruption")),
        "settings": guarded(_settings, base("settings")),
        "old_run": guarded(_old_run, base("old_run")),
        "rollback": guarded(_rollback, base("rollback")),
        "preflight": guarded(_preflight, base("preflight"), workdir),
        "enospc": guarded(_enospc, base("enospc")),
        "nonfinite": guarded(_nonfinite, base("nonfinite")),
        "cli_nonfinite": guarded(_cli_nonfinite, base("cli_nonfinite")),
        "cli_sigterm_async": guarded(_cli_sigterm_async, base("cli_sigterm")),
        "tails": guarded(_tails, base("tails")),
        "async": guarded(_async_matches_sync, base("async")),
    }


# --- two ranks -------------------------------------------------------------------------


def _layout_integrity(base: dict, layout: dict) -> dict:
    items = {**base, **layout, "steps": 4, "checkpoint.interval": 2}
    _, history = _run(items)
    folder = Path(base["output_dir"]) / "checkpoints"
    from d9d.checkpoint.manifest import read_manifest

    files = sorted(read_manifest(folder / "step-4")["files"])
    shard = folder / "step-4" / "__1_0.distcp"  # written by rank 1
    _barrier()
    if _is_main():
        _flip_bytes(shard)
    _barrier()
    refusal = _refused(items)
    async_items = {
        **items,
        "output_dir": base["output_dir"] + "_async",
        "checkpoint.async_save": True,
    }
    _, async_history = _run(async_items)
    async_folder = Path(async_items["output_dir"]) / "checkpoints"
    async_files = sorted(read_manifest(async_folder / "step-4")["files"])
    return {
        "files": files,
        "refusal": refusal,
        "shard": str(shard),
        "previous": str(folder / "step-2"),
        "sync": [m.loss for m in history],
        "async": [m.loss for m in async_history],
        "async_files": async_files,
        "async_left": _listing(async_folder),
    }


def _layout_rollback(base: dict, layout: dict) -> dict:
    items = {**base, **layout, "steps": 6, "checkpoint.interval": 2, "checkpoint.keep_last": 3}
    _run(items)
    folder = Path(base["output_dir"]) / "checkpoints"
    fork = {
        **items,
        "steps": 4,
        "clip.max_norm": 0.25,
        "checkpoint.allow_changes": True,
        "checkpoint.resume_from": str(folder / "step-2"),
    }
    _run(fork)
    log: list = []
    restart = {**items, "clip.max_norm": 0.25, "checkpoint.allow_changes": True}
    _run(restart, log)
    return {
        "left": _listing(folder),
        "log": log,
        "metrics": _steps(Path(base["output_dir"]) / "metrics.jsonl") if _is_main() else None,
        "folder": str(folder),
    }


def _layout_export(base: dict, layout: dict) -> dict:
    import safetensors.torch

    items = {**base, **layout, "steps": 2}
    trainer, _ = _run(items)
    folder = trainer.export_hf(Path(base["output_dir"]) / "hf")
    own = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for module in trainer.modules
        for k, v in module.state_dict().items()
    }
    if not _is_main():
        return {"rank": dist.get_rank()}
    exported = {}
    for file in folder.glob("*.safetensors"):
        exported.update(safetensors.torch.load_file(file))
    # One vocabulary split: HF names drop the split's name.
    renamed = {
        re.sub(r"^lm_head\.lm_head\.\w+\.", "lm_head.", re.sub(r"token_embedding\.\w+\.", "", k)): v
        for k, v in own.items()
    }
    return {
        "rank": 0,
        "written": _listing(folder),
        "missing": sorted(renamed.keys() - exported.keys()),
        "equal": all(torch.equal(exported[k], v) for k, v in renamed.items() if k in exported),
    }


def two_ranks(workdir: str, corpus: str, init: str) -> dict:
    """The checkpoint scenarios where the layout matters (two spawned ranks)."""
    results = {}
    for name in ("dp_shard=2", "pp=2 (1f1b)"):
        layout = {**LAYOUTS[name], "model.init": init}
        tag = name.split()[0].replace("=", "")
        results[f"integrity {name}"] = guarded(
            _layout_integrity, overrides(Path(corpus), Path(workdir) / f"int_{tag}"), layout
        )
    dp = {**LAYOUTS["dp_shard=2"], "model.init": init}
    results["rollback dp_shard=2"] = guarded(
        _layout_rollback, overrides(Path(corpus), Path(workdir) / "rollback"), dp
    )
    results["export dp_shard=2"] = guarded(
        _layout_export,
        overrides(Path(corpus), Path(workdir) / "export", **{"checkpoint.export_hf": True}),
        dp,
    )
    return results
