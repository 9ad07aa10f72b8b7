"""Checks before the first step: writable folders and room for the checkpoints.

A run used to find out at its first save that its checkpoint folder was a file, under
``/proc`` or on a full disk, after training every step up to it. Here, before anything
is built:

* :func:`prepare_folders`: the output folder, the checkpoint folder (and a token cache
  folder if one is set) are created and written to: a probe file is written, flushed with
  ``fsync`` and removed;
* :func:`check_free_space` (once the model's shape is known): the checkpoint folder's
  file system has room for the checkpoints that will exist at once (``keep_last`` plus
  the one being written, fewer if the run saves fewer), and the output folder's for the
  HF export.

Rank 0 checks; every rank raises the same one-line ``ValueError`` (naming the path and
what is needed), so that no rank is left waiting in a collective.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.checkpoint.disk_space import (
    device_of,
    estimate_checkpoint_bytes,
    existing_parent,
    free_bytes,
    size_text,
)
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLMParameters
from d9d.module.model.qwen3_dense.model import whole_model
from d9d.train.config import TrainConfig


def _agree(problem: str | None) -> None:
    # Rank 0's verdict for everyone.
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ValueError(problem)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def probe_folder(what: str, path: Path) -> str | None:
    """Creates ``path`` and writes, syncs and removes a probe file in it.

    Returns:
        The one-line problem, or ``None`` if the folder is usable.
    """
    if path.exists() and not path.is_dir():
        return f"{what} {path} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        other = err.filename not in (None, str(path))
        blocker = f" ({err.filename} is in the way)" if other else ""
        return f"cannot create {what} {path}: {err.strerror or err}{blocker}"
    probe = path / f".d9d-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        return f"cannot write to {what} {path}: {err.strerror or err}"
    return None


def prepare_folders(config: TrainConfig) -> None:
    """Creates and probes the run's folders (every rank calls it).

    Raises:
        ValueError: Naming the first folder that cannot be created or written.
    """
    problem = None
    if _is_main():
        folders = [("output_dir", Path(config.output_dir))]
        folders.append(("checkpoint.folder", config.checkpoint_folder))
        if config.data.cache_dir and config.data.source != "tokens":
            folders.append(("data.cache_dir", Path(config.data.cache_dir)))
        for what, path in folders:
            problem = probe_folder(what, path)
            if problem:
                break
    _agree(problem)


def model_parameter_numels(params: Qwen3DenseForCausalLMParameters) -> list[int]:
    """The element count of every parameter of the whole model (built on ``meta``)."""
    with torch.device("meta"):
        return [p.numel() for p in whole_model(params).parameters()]


def saves_left(config: TrainConfig, step: int) -> int:
    """Checkpoints the run will write from ``step`` on."""
    ck = config.checkpoint
    saves = 0
    if ck.interval:
        saves = config.steps // ck.interval - step // ck.interval
    final_counted = bool(ck.interval) and config.steps % ck.interval == 0
    if ck.save_final and step < config.steps and not final_counted:
        saves += 1
    if ck.export_hf and saves == 0:
        saves = 1  # the export saves the final step first if it has no checkpoint
    return saves


def check_free_space(
    config: TrainConfig,
    params: Qwen3DenseForCausalLMParameters,
    param_dtype: torch.dtype,
    *,
    step: int,
    own_checkpoints: int,
) -> int:
    """Refuses a run whose checkpoints (and HF export) cannot fit (every rank calls it).

    Args:
        config: The run.
        params: The model's parameters.
        param_dtype: Dtype of the parameters and AdamW's state.
        step: The step the run starts from.
        own_checkpoints: Checkpoints of the live branch already in the folder.

    Returns:
        The estimated size of one checkpoint in bytes.

    Raises:
        ValueError: ``not enough free space ...`` naming the folder, its device, what is
            free and what is needed.
    """
    numels = model_parameter_numels(params)
    itemsize = torch.empty((), dtype=param_dtype).element_size()
    estimate = estimate_checkpoint_bytes(numels, itemsize)
    problem = None
    if _is_main():
        ck = config.checkpoint
        saves = saves_left(config, step)
        peak = min(own_checkpoints + saves, ck.keep_last + 1) - own_checkpoints
        new = max(1, peak) if saves else 0
        folder = config.checkpoint_folder
        export = 4 * sum(numels) if ck.export_hf else 0  # the export writes fp32 weights
        output = Path(config.output_dir)
        same_device = (
            os.stat(existing_parent(output)).st_dev == os.stat(existing_parent(folder)).st_dev
        )
        need = new * estimate + (export if same_device else 0)
        free = free_bytes(folder)
        if need > free:
            what = (
                f"{new} new checkpoint(s) of about {size_text(estimate)} each "
                f"(checkpoint.keep_last={ck.keep_last} kept plus the one being written)"
            )
            if export and same_device:
                what += f" and the HF export of about {size_text(export)}"
            problem = (
                f"not enough free space for checkpoints in {folder} on {device_of(folder)}: "
                f"need about {size_text(need)} for {what}, {size_text(free)} free; free space, "
                "lower checkpoint.keep_last, or set checkpoint.folder elsewhere"
            )
        elif export and not same_device and export > free_bytes(output):
            problem = (
                f"not enough free space for the HF export in {output} on {device_of(output)}: "
                f"need about {size_text(export)}, {size_text(free_bytes(output))} free; free "
                "space or set checkpoint.export_hf=false"
            )
    _agree(problem)
    return estimate
