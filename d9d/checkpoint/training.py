"""Training checkpoints: model, optimizer, LR scheduler, data cursor, RNG states and step.

A checkpoint is a folder ``step-<N>`` (``N`` = optimizer steps done; ``step-<N>.b<k>`` on
a later branch, see ``d9d.checkpoint.lineage``) holding

* a ``torch.distributed.checkpoint`` (DCP) of the model and optimizer states, taken with
  ``get_state_dict`` with flattened optimizer keys, so that every tensor is stored once,
  under its model name and global shape: FSDP2 shards and pipeline stages reshard on
  load, and a checkpoint written under one layout resumes under another;
* ``train_state.json``: step, LR scheduler, data cursor, the model's parameters (to
  refuse an incompatible model), the config and the layout that wrote it;
* ``rng/rank<R>.pt``: each rank's Python, NumPy and torch (CPU and accelerator) RNG states;
* ``manifest.json``, written last: every other file's size and CRC-32, the step, branch,
  layout and config hash (``d9d.checkpoint.manifest``).

It is written as ``step-<N>.tmp`` and renamed once every rank has finished and the
manifest is on disk, so a crash mid-save leaves only an ignorable ``.tmp`` folder and the
previous checkpoint intact. A checkpoint is verified against its manifest before anything
is read from it. A save prunes only its own branch's checkpoints beyond the last
``keep_last``, and never the newest one whose step had a finite gradient norm.

With ``async_save`` the tensors are staged into CPU memory (DCP's ``async_save``) and
written, checksummed and renamed by a background thread on a process group of its own
while training goes on; the next save, :meth:`CheckpointManager.wait` and
:meth:`CheckpointManager.close` wait for it.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from d9d.checkpoint.disk_space import no_space_message
from d9d.checkpoint.lineage import (
    LINEAGE_FILE,
    FoundCheckpoint,
    Lineage,
    StartPlan,
    checkpoint_name,
    lineage_of,
    move_aside,
    parse_checkpoint_name,
    plan_start,
    read_lineage,
    write_lineage,
)
from d9d.checkpoint.manifest import (
    check_files,
    describe_files,
    fsync_dir,
    fsync_file,
    list_files,
    read_manifest,
    write_file_synced,
    write_manifest,
)
from d9d.checkpoint.model_checkpoint import quiet_single_process

# The DCP keys of a training checkpoint: the model's state dict, the optimizers' (flat).
_MODEL_KEY = "model"
_OPTIM_KEY = "optim"
_STATE_FILE = "train_state.json"
_FORMAT = 2
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (corrupted, incomplete or incompatible)."""


class CheckpointSaveError(CheckpointError):
    """A save that failed; its ``.tmp`` folder was removed, older checkpoints are intact."""


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


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _gather(obj: Any, group=None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _from_rank0(obj: Any, group=None) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    # Every group here spans the whole world, so its rank 0 is global rank 0.
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


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


def config_hash(config: dict | None) -> str | None:
    """A short SHA-256 of a config's canonical JSON (what the manifest records)."""
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Save:
    # One save in flight: where it goes and what its manifest records.
    step: int
    tmp: Path
    final: Path
    record: dict
    started: float
    blocking: float = 0.0


class CheckpointManager:
    """Saves, finds, verifies, prunes and loads the checkpoints of one run folder.

    Every rank of the job creates one (in the same order: with ``async_save`` it creates
    a process group) and calls ``start``/``save``/``load``/``verify``/``wait`` together.

    Attributes:
        folder: The checkpoint folder.
        keep_last: Complete checkpoints of the live branch kept after a save.
        async_save: Whether saves write in the background.
        lineage: The run and its branches (set by :meth:`begin`; a fresh run otherwise).
        estimate_bytes: About how large one checkpoint is (for "no space" messages).
        before_commit: Called with the step after a save's files are written and before
            its manifest (a testing aid simulates crashes there).
        on_complete: Called on rank 0 with the step, folder, seconds from start to rename
            and seconds training was blocked, of each completed save (from the background
            thread for async saves).
        last_save_seconds: Time the last save blocked training.
        last_write_seconds: Time the last completed save took from start to rename.
    """

    def __init__(self, folder: str | os.PathLike, *, keep_last: int = 2, async_save: bool = False):
        """Points the manager at a folder (nothing is read or written yet).

        Args:
            folder: The run's checkpoint folder (shared by all ranks).
            keep_last: How many complete checkpoints of the live branch to keep.
            async_save: Write saves in the background (DCP ``async_save``).
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.async_save = async_save
        self.lineage = Lineage.new()
        self.estimate_bytes: int | None = None
        self.before_commit: Callable[[int], None] | None = None
        self.last_save_seconds: float | None = None
        self.last_write_seconds: float | None = None
        self.on_complete: Callable[[int, Path, float, float], None] | None = None
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group = None
        if async_save and dist.is_initialized():
            # The background thread's collectives must never interleave with the
            # training's on the default group: it gets a gloo group of its own.
            self._group = dist.new_group(backend="gloo")

    @property
    def branch(self) -> str:
        """The branch this run writes (the lineage's live branch)."""
        return self.lineage.live

    # --- finding ------------------------------------------------------------------------

    def found(self) -> list[FoundCheckpoint]:
        """Every checkpoint folder (any branch, ``.tmp`` excluded), oldest step first."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            parsed = parse_checkpoint_name(entry.name)
            if parsed is None or not entry.is_dir():
                continue
            try:
                manifest = read_manifest(entry)
            except ValueError:
                manifest = None
            found.append(FoundCheckpoint(entry, parsed[0], parsed[1], manifest))
        return sorted(found, key=lambda f: (f.step, f.branch))

    def complete_checkpoints(self) -> list[Path]:
        """The live branch's checkpoints and those on its history, oldest first."""
        return [
            f.path
            for f in self.found()
            if f.manifest is not None and self.lineage.on_history(self.branch, f.branch, f.step)
        ]

    def latest(self) -> Path | None:
        """The newest complete checkpoint on the live branch's history, or ``None``."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def checkpoint_of(self, step: int) -> Path | None:
        """The complete checkpoint of ``step`` on the live branch's history, or ``None``."""
        for path in reversed(self.complete_checkpoints()):
            parsed = parse_checkpoint_name(path.name)
            if parsed is not None and parsed[0] == step:
                return path
        return None

    def path_of(self, step: int) -> Path:
        """The folder of the live branch's checkpoint of ``step``."""
        return self.folder / checkpoint_name(step, self.branch)

    # --- starting -----------------------------------------------------------------------

    def plan(self, *, resume: bool, resume_from: Path | None, overwrite: bool) -> StartPlan:
        """Decides (on rank 0, for every rank) how the run starts; see ``lineage.py``.

        Raises:
            ValueError: If the start would resume into or overwrite another run's or
                branch's checkpoints (on every rank).
        """
        result: Any = None
        if _rank() == 0:
            try:
                found = self.found()
                lineage = read_lineage(self.folder) or lineage_of(found)
                result = plan_start(
                    self.folder,
                    found,
                    lineage,
                    resume=resume,
                    resume_from=resume_from,
                    overwrite=overwrite,
                )
            except ValueError as err:
                result = str(err)
        result = _from_rank0(result)
        if isinstance(result, str):
            raise ValueError(result)
        return result

    def begin(self, plan: StartPlan) -> None:
        """Applies a start plan once the resume succeeded: moves aside, writes the lineage."""
        self.lineage = plan.lineage
        if _rank() == 0:
            if plan.move_aside:
                names = [
                    e.name
                    for e in self.folder.iterdir()
                    if parse_checkpoint_name(e.name.removesuffix(".tmp")) or e.name == LINEAGE_FILE
                ]
                move_aside(self.folder, names)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_lineage(self.folder, self.lineage)
        _barrier()

    # --- verifying ----------------------------------------------------------------------

    def _problems(self, path: Path) -> list[str]:
        # Every rank checks its share of the files; all ranks get every problem.
        try:
            files = read_manifest(path)["files"]
        except ValueError as err:
            return [str(err)]
        names = sorted(files)
        mine = names[_rank() :: _world_size()]
        found = check_files(path, {n: files[n] for n in mine})
        return [p for rank in _gather(found) for p in rank]

    def verify(self, path: str | os.PathLike) -> dict:
        """Checks every file of checkpoint ``path`` against its manifest (every rank).

        Returns:
            The manifest.

        Raises:
            CheckpointError: Naming the first file that differs and the newest checkpoint
                that verifies (or saying there is none).
        """
        path = Path(path)
        problems = self._problems(path)
        if not problems:
            return read_manifest(path)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path} failed verification: {problems[0]}{more}; "
            f"{self._fallback_hint(path)}"
        )

    def _fallback_hint(self, path: Path) -> str:
        parsed = parse_checkpoint_name(path.name)
        step = parsed[0] if parsed else None
        candidates = [
            f
            for f in reversed(self.found())
            if f.path != path and f.manifest is not None and (step is None or f.step < step)
        ]
        if parsed is not None:
            branch = parsed[1]
            if branch in self.lineage.branches:
                candidates = [
                    f for f in candidates if self.lineage.on_history(branch, f.branch, f.step)
                ]
        for candidate in candidates:
            if not self._problems(candidate.path):
                return (
                    f"the newest verified checkpoint is {candidate.path}: set "
                    f"checkpoint.resume_from={candidate.path} to continue from it"
                )
        return "no older checkpoint verifies either; start afresh in another folder"

    # --- saving -------------------------------------------------------------------------

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
        last_step_finite: bool = True,
    ) -> Path:
        """Writes checkpoint ``step`` atomically, then prunes the branch's old ones.

        With ``async_save`` it returns once the tensors are staged in CPU memory; the
        write, manifest, rename and prune happen in the background (:meth:`wait`).

        Args:
            step: Optimizer steps done.
            modules: This rank's stage modules.
            optimizers: One optimizer per stage module, in the same order.
            scheduler: The LR scheduler (the first, if each stage has one; they agree).
            data_state: The data cursor.
            model_params: The model's parameters as JSON-able data (compared on load).
            extra: More JSON-able data to store (``"layout"``, ``"config"``, ...).
            last_step_finite: Whether the step just done had a finite gradient norm
                (the newest such checkpoint is never pruned).

        Returns:
            The checkpoint folder (complete once the save has finished).

        Raises:
            CheckpointSaveError: If this save (or a background one before it) failed; its
                ``.tmp`` is removed, the message names the cause ("no space left on
                <device> ...") and the newest complete checkpoint.
        """
        self.wait()
        started = time.perf_counter()
        rank = _rank()
        final = self.path_of(step)
        tmp = final.with_name(final.name + ".tmp")
        extra = extra or {}
        record = {
            "step": step,
            "branch": self.branch,
            "run": self.lineage.run,
            "lineage": self.lineage.to_json(),
            "layout": extra.get("layout"),
            "world_size": _world_size(),
            "config_hash": config_hash(extra.get("config")),
            "last_step_finite": bool(last_step_finite),
        }
        save = _Save(step, tmp, final, record, started)
        problem = None
        if rank == 0:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                # Leftovers of a crash mid-save: never complete, safe to drop.
                for stale in self.folder.glob("step-*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                if final.exists():
                    # Never delete a checkpoint: an earlier one of this name goes aside.
                    move_aside(self.folder, [final.name])
                (tmp / "rng").mkdir(parents=True)
            except OSError as err:
                problem = f"cannot create {tmp}: {err.strerror or err}"
        problem = _from_rank0(problem)
        if problem:
            raise CheckpointSaveError(problem)
        tensors, _ = _tensor_state(_pairs(modules, optimizers))
        try:
            if self.async_save:
                upload = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group)
            else:
                with quiet_single_process():
                    dcp.save(tensors, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as err:
            self._fail(save, err, group=None)
        del tensors
        # The small files are written on the main thread: they describe this step.
        local = None
        try:
            rng_file = tmp / "rng" / f"rank{rank}.pt"
            torch.save(_rng_state(), rng_file)
            fsync_file(rng_file)
            if rank == 0:
                state = {
                    "format": _FORMAT,
                    "step": step,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "data": data_state,
                    "model_params": model_params,
                    "world_size": _world_size(),
                    "extra": extra,
                }
                write_file_synced(tmp / _STATE_FILE, json.dumps(state, indent=1).encode())
        except OSError as err:
            local = err
        errors = [e for e in _gather(None if local is None else repr(local)) if e]
        if errors:
            if self.async_save:
                self._wait_quietly(upload)
            self._fail(save, local or RuntimeError(errors[0]), group=None)
        if self.async_save:
            self._executor = self._executor or ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="d9d-checkpoint"
            )
            save.blocking = time.perf_counter() - started
            self._pending = self._executor.submit(self._finish_in_background, upload, save)
        else:
            self._commit(save, group=None)
            save.blocking = time.perf_counter() - started
            self._completed(save)
        self.last_save_seconds = save.blocking
        return final

    @staticmethod
    def _wait_quietly(upload: Future) -> None:
        with contextlib.suppress(Exception, CheckpointException):
            upload.result()

    def _finish_in_background(self, upload: Future, save: _Save) -> Path:
        try:
            upload.result()
        except (Exception, CheckpointException) as err:
            self._fail(save, err, group=self._group)
        final = self._commit(save, group=self._group)
        self._completed(save)
        return final

    def _commit(self, save: _Save, group) -> Path:
        # Every rank's files are written: checksum them (each rank its share), then rank 0
        # writes the manifest, renames, prunes.
        _barrier(group)
        local: Any
        try:
            names = list_files(save.tmp)
            local = describe_files(save.tmp, names[_rank() :: _world_size()])
        except OSError as err:
            local = f"reading back {save.tmp}: {err}"
        gathered = _gather(local, group)
        failed = [g for g in gathered if isinstance(g, str)]
        if failed:
            self._fail(save, RuntimeError(failed[0]), group)
        if self.before_commit is not None:
            self.before_commit(save.step)
        problem = None
        if _rank() == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            try:
                write_manifest(save.tmp, {**save.record, "created": time.time()}, files)
                os.replace(save.tmp, save.final)
                fsync_dir(self.folder)
            except OSError as err:
                problem = err
        problem = _from_rank0(None if problem is None else repr(problem), group)
        if problem is not None:
            self._fail(save, RuntimeError(problem), group)
        if _rank() == 0:
            self._prune()
        _barrier(group)
        self.last_write_seconds = time.perf_counter() - save.started
        return save.final

    def _completed(self, save: _Save) -> None:
        if self.on_complete is not None and _rank() == 0:
            self.on_complete(save.step, save.final, self.last_write_seconds, save.blocking)

    def _fail(self, save: _Save, err: BaseException, group) -> None:
        # Every rank arrives here together (DCP's errors are collective, ours are
        # gathered): rank 0 removes the .tmp, and all raise the same one-line error.
        _barrier(group)
        message = None
        if _rank() == 0:
            message = no_space_message(err, save.tmp, self.estimate_bytes or 0)
            shutil.rmtree(save.tmp, ignore_errors=True)
            latest = self.latest()
            kept = f"the newest complete checkpoint is {latest}" if latest else "no checkpoint"
            if message is None:
                message = f"saving {save.final} failed ({_last_line(err)})"
            message = f"{message}; {save.tmp} was removed, {kept} is intact"
        message = _from_rank0(message, group)
        raise CheckpointSaveError(message) from err

    def _prune(self) -> None:
        # Only this run's checkpoints of the live branch; never the newest finite one.
        own = [
            f
            for f in self.found()
            if f.branch == self.branch
            and f.manifest is not None
            and f.manifest.get("run") == self.lineage.run
        ]
        keep = {f.path for f in own[-self.keep_last :]}
        finite = [f for f in own if f.manifest.get("last_step_finite", True)]
        if finite:
            keep.add(finite[-1].path)
        for f in own:
            if f.path not in keep:
                shutil.rmtree(f.path, ignore_errors=True)

    def wait(self) -> Path | None:
        """Waits for a background save (every rank); returns its folder, or ``None``.

        Raises:
            CheckpointSaveError: If it failed (its ``.tmp`` is already removed).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()

    @property
    def pending(self) -> bool:
        """Whether a background save is in flight or not yet collected."""
        return self._pending is not None

    def close(self) -> None:
        """Waits for a background save and stops the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # --- loading ------------------------------------------------------------------------

    def read_train_state(self, path: str | os.PathLike) -> dict:
        """Reads ``train_state.json`` of checkpoint ``path``.

        Raises:
            CheckpointError: If it is missing or unreadable.
        """
        path = Path(path)
        try:
            state = json.loads((path / _STATE_FILE).read_text())
            if state.get("format") != _FORMAT or not (path / ".metadata").is_file():
                raise ValueError(f"format {state.get('format')!r} or DCP metadata missing")
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is corrupted or incomplete ({err})") from err
        return state

    def load(
        self,
        path: str | os.PathLike,
        modules: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
        model_params: dict | None = None,
        verified: bool = False,
    ) -> ResumeState:
        """Verifies, then loads checkpoint ``path`` into this rank's modules and optimizers.

        The modules must be materialised and parallelized as for training (any layout);
        RNG states are restored (this rank's, or rank 0's if the world grew).

        Args:
            path: A complete checkpoint folder.
            modules: This rank's stage modules.
            optimizers: One optimizer per stage module.
            schedulers: LR schedulers to restore (all get the saved state).
            model_params: The model's parameters; a checkpoint of another model is
                refused.
            verified: The caller already ran :meth:`verify` on it.

        Returns:
            The step, data cursor and extras.

        Raises:
            CheckpointError: If the checkpoint fails verification, is incomplete or holds
                another model.
        """
        path = Path(path)
        if not verified:
            self.verify(path)
        state = self.read_train_state(path)
        if model_params is not None and state["model_params"] != model_params:
            diff = _differences(state["model_params"], model_params)
            raise CheckpointError(
                f"checkpoint {path} holds an incompatible model: " + "; ".join(diff[:10])
            )
        pairs = _pairs(modules, optimizers)
        tensors, owners = _tensor_state(pairs)
        try:
            with quiet_single_process():
                dcp.load(tensors, checkpoint_id=str(path))
        # DCP wraps reader errors in CheckpointException, a BaseException.
        except (Exception, CheckpointException) as err:
            raise CheckpointError(
                f"checkpoint {path} could not be read ({_last_line(err)})"
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
            try:
                rng = torch.load(rng_file, weights_only=False)
            except Exception as err:
                raise CheckpointError(
                    f"checkpoint {path}: {rng_file} could not be read ({_last_line(err)})"
                ) from err
            _set_rng_state(rng)
        return ResumeState(path, int(state["step"]), state["data"], state.get("extra", {}))


# --- the model's tensors of a checkpoint, one at a time (HF export) --------------------


def model_tensor_specs(path: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (global shape, dtype) of every model tensor of training checkpoint ``path``.

    Reads only the DCP metadata (no tensor data).
    """
    metadata = FileSystemReader(str(path)).read_metadata()
    prefix = f"{_MODEL_KEY}."
    return {
        key[len(prefix) :]: (value.size, value.properties.dtype)
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)
    }


def read_model_tensor(
    path: str | os.PathLike, name: str, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """One model tensor of training checkpoint ``path``, whole, on the CPU.

    Only this tensor's bytes are read, on this process alone (no collective).

    Raises:
        CheckpointError: If it could not be read.
    """
    tensor = torch.empty(shape, dtype=dtype)
    state = {_MODEL_KEY: {name: tensor}}
    try:
        with warnings.catch_warnings():
            # no_dist=True is the point (one reader while the other ranks wait).
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"checkpoint {path}: tensor {name} could not be read ({_last_line(err)})"
        ) from err
    return state[_MODEL_KEY][name]


def load_model_weights(path: str | os.PathLike, module: nn.Module) -> None:
    """Fills a plain (unsharded) module with the model weights of training checkpoint ``path``.

    Only the module's own keys are read (no optimizer state), whatever layout wrote the
    checkpoint; the module must be materialised (``to_empty``). Every rank that calls it
    reads; with a process group, call it on every rank together.

    Args:
        path: A complete training checkpoint folder.
        module: The module to fill.

    Raises:
        CheckpointError: If the checkpoint could not be read.
    """
    state = {_MODEL_KEY: module.state_dict()}
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({_last_line(err)})") from err
    module.load_state_dict(state[_MODEL_KEY])


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
