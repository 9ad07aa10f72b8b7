"""Training checkpoints: model, optimizer, LR scheduler, data cursor, RNG states and step.

A checkpoint is a folder ``step-<N>`` (``N`` = optimizer steps done) holding

* a ``torch.distributed.checkpoint`` (DCP) of the model and optimizer states, taken with
  ``get_state_dict`` with flattened optimizer keys, so that every tensor is stored once,
  under its model name and global shape: FSDP2 shards and pipeline stages reshard on
  load, and a checkpoint written under one layout resumes under another;
* ``train_state.json``: step, LR scheduler, data cursor, the model's parameters (to
  refuse an incompatible model) and the layout that wrote it;
* ``rng/rank<R>.pt``: each rank's Python, NumPy and torch (CPU and accelerator) RNG states.

It is written as ``step-<N>.tmp`` and renamed once every rank has finished, so a crash
mid-save leaves only an ignorable ``.tmp`` folder and the previous checkpoint intact.
Only the last ``keep_last`` complete checkpoints are kept.
"""

import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# The DCP keys of a training checkpoint: the model's state dict, the optimizers' (flat).
_MODEL_KEY = "model"
_OPTIM_KEY = "optim"
_STATE_FILE = "train_state.json"
_FORMAT = 1
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (corrupted, incomplete or incompatible)."""


@dataclass
class ResumeState:
    """What a loaded checkpoint hands back besides the tensors it filled in.

    Attributes:
        path: The checkpoint folder.
        step: Optimizer steps done.
        data_state: The data cursor (``PackedBatches.state_dict()``).
        extra: Anything else the writer stored.
    """

    path: Path
    step: int
    data_state: dict
    extra: dict


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pairs(
    modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    if len(modules) != len(optimizers):
        raise ValueError(
            f"one optimizer per stage module is needed, got {len(modules)} modules and "
            f"{len(optimizers)} optimizers"
        )
    return list(zip(modules, optimizers, strict=True))


def _tensor_state(
    pairs: list[tuple[nn.Module, torch.optim.Optimizer]],
) -> tuple[dict[str, Any], list[tuple[list[str], list[str]]]]:
    # One flat dict for DCP, plus which keys belong to which (module, optimizer) pair.
    merged: dict[str, Any] = {_MODEL_KEY: {}, _OPTIM_KEY: {}}
    owners = []
    for module, optimizer in pairs:
        model_sd, optim_sd = get_state_dict(module, optimizer, options=_OPTIONS)
        # Optimizer hyperparameters (lr, betas) come from the config and the scheduler,
        # and stage modules would each repeat them under their own parameter names.
        overlap = merged[_MODEL_KEY].keys() & model_sd.keys()
        if overlap:
            raise ValueError(f"stage modules share state-dict keys: {sorted(overlap)[:5]}")
        merged[_MODEL_KEY].update(model_sd)
        merged[_OPTIM_KEY].update(optim_sd)
        owners.append((list(model_sd), list(optim_sd)))
    return merged, owners


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints of one run folder.

    Every rank of the job creates one and calls ``save``/``load`` together.
    """

    def __init__(self, folder: str | os.PathLike, *, keep_last: int = 2):
        """Points the manager at a folder (nothing is read or written yet).

        Args:
            folder: The run's checkpoint folder (shared by all ranks).
            keep_last: How many complete checkpoints to keep.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.last_save_seconds: float | None = None

    def complete_checkpoints(self) -> list[Path]:
        """The complete checkpoints (``step-N`` folders, no ``.tmp``), oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(
        self,
        step: int,
        modules: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        data_state: dict,
        model_params: dict,
        extra: dict | None = None,
    ) -> Path:
        """Writes checkpoint ``step-<step>`` atomically, then prunes old ones.

        Args:
            step: Optimizer steps done.
            modules: This rank's stage modules.
            optimizers: One optimizer per stage module, in the same order.
            scheduler: The LR scheduler (the first, if each stage has one; they agree).
            data_state: The data cursor.
            model_params: The model's parameters as JSON-able data (compared on load).
            extra: More JSON-able data to store (e.g. the layout or config).

        Returns:
            The complete checkpoint folder.
        """
        started = time.perf_counter()
        rank = _rank()
        final = self.folder / f"step-{step}"
        tmp = self.folder / f"step-{step}.tmp"
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Leftovers of a crash mid-save: never complete, safe to drop.
            for stale in self.folder.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        tensors, _ = _tensor_state(_pairs(modules, optimizers))
        dcp.save(tensors, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
        if rank == 0:
            state = {
                "format": _FORMAT,
                "step": step,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "data": data_state,
                "model_params": model_params,
                "world_size": _world_size(),
                "extra": extra or {},
            }
            (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1))
        _barrier()
        if rank == 0:
            os.replace(tmp, final)
            for old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self.last_save_seconds = time.perf_counter() - started
        return final

    def _previous_hint(self, path: Path) -> str:
        older = [p for p in self.complete_checkpoints() if _step_of(p) < _step_of(path)]
        if not older:
            return "there is no earlier checkpoint; delete it to start from scratch"
        previous = older[-1]
        return (
            f"to resume from the previous checkpoint, delete or move {path} (or set "
            f"checkpoint.resume_from={previous})"
        )

    def read_train_state(self, path: str | os.PathLike) -> dict:
        """Reads ``train_state.json`` of checkpoint ``path``.

        Raises:
            CheckpointError: If it is missing or unreadable (naming the checkpoint and how
                to resume from the previous one).
        """
        path = Path(path)
        try:
            state = json.loads((path / _STATE_FILE).read_text())
            if state.get("format") != _FORMAT or not (path / ".metadata").is_file():
                raise ValueError(f"format {state.get('format')!r} or DCP metadata missing")
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {path} is corrupted or incomplete ({err}); {self._previous_hint(path)}"
            ) from err
        return state

    def load(
        self,
        path: str | os.PathLike,
        modules: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
        model_params: dict | None = None,
    ) -> ResumeState:
        """Loads checkpoint ``path`` into this rank's modules, optimizers and schedulers.

        The modules must be materialised and parallelized as for training (any layout);
        RNG states are restored (this rank's, or rank 0's if the world grew).

        Args:
            path: A complete checkpoint folder.
            modules: This rank's stage modules.
            optimizers: One optimizer per stage module.
            schedulers: LR schedulers to restore (all get the saved state).
            model_params: The model's parameters; a checkpoint of another model is
                refused.

        Returns:
            The step, data cursor and extras.

        Raises:
            CheckpointError: If the checkpoint is corrupted, incomplete or of another model.
        """
        path = Path(path)
        state = self.read_train_state(path)
        if model_params is not None and state["model_params"] != model_params:
            diff = _differences(state["model_params"], model_params)
            raise CheckpointError(
                f"checkpoint {path} holds an incompatible model: " + "; ".join(diff[:10])
            )
        pairs = _pairs(modules, optimizers)
        tensors, owners = _tensor_state(pairs)
        try:
            dcp.load(tensors, checkpoint_id=str(path))
        # DCP wraps reader errors in CheckpointException, a BaseException.
        except (Exception, CheckpointException) as err:
            raise CheckpointError(
                f"checkpoint {path} could not be read ({_last_line(err)}); "
                f"{self._previous_hint(path)}"
            ) from err
        for (module, optimizer), (model_keys, optim_keys) in zip(pairs, owners, strict=True):
            set_state_dict(
                module,
                optimizer,
                model_state_dict={k: tensors[_MODEL_KEY][k] for k in model_keys},
                optim_state_dict={k: tensors[_OPTIM_KEY][k] for k in optim_keys},
                options=_OPTIONS,
            )
        for scheduler in schedulers:
            if state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
        rng_dir = path / "rng"
        own = rng_dir / f"rank{_rank()}.pt"
        rng_file = own if own.is_file() else rng_dir / "rank0.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return ResumeState(path, int(state["step"]), state["data"], state.get("extra", {}))


def load_model_weights(path: str | os.PathLike, module: nn.Module) -> None:
    """Fills a plain (unsharded) module with the model weights of training checkpoint ``path``.

    Only the module's own keys are read (no optimizer state), whatever layout wrote the
    checkpoint; the module must be materialised (``to_empty``). Every rank that calls it
    reads; with a process group, call it on every rank together.

    Args:
        path: A complete training checkpoint folder.
        module: The module to fill (e.g. the whole model on the CPU, for an export).

    Raises:
        CheckpointError: If the checkpoint could not be read.
    """
    state = {_MODEL_KEY: module.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({_last_line(err)})") from err
    module.load_state_dict(state[_MODEL_KEY])


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(saved.keys() | current.keys()):
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    if saved != current:
        return [f"{prefix.rstrip('.')}: checkpoint {saved!r}, model {current!r}"]
    return []


def _last_line(err: BaseException) -> str:
    # DCP's messages carry whole tracebacks; their last line names the real problem.
    lines = str(err).strip().splitlines()
    return lines[-1] if lines and lines[-1].strip() else type(err).__name__
