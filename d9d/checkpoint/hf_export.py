"""An HF ``Qwen3ForCausalLM`` folder from a training checkpoint, on one rank, streamed.

A training checkpoint holds every stage's weights under their plain names and global
shapes, whatever the layout that wrote it. Rank 0 verifies the checkpoint's files, plans
the HF tensors and shards from the DCP metadata alone (no data read), then reads each
tensor from the checkpoint just before writing it into its safetensors shard
(``write_safetensors_streaming``) and drops it: the vocabulary splits of the embedding
and the LM head are read one by one and concatenated into the HF matrix. Peak host
memory is therefore about the largest HF tensor twice (the concatenated vocabulary
matrix and its pieces), whatever the model size or the number of ranks; the other ranks
only wait for rank 0's verdict.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.checkpoint.manifest import check_files, read_manifest
from d9d.checkpoint.safetensors_io import (
    SAFETENSORS_INDEX,
    parse_shard_size,
    plan_shards,
    shard_file_names,
    write_safetensors_streaming,
)
from d9d.checkpoint.training import CheckpointError, model_tensor_specs, read_model_tensor
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLMParameters
from d9d.module.model.qwen3_dense.hf import hf_tensor_parts
from d9d.module.model.qwen3_dense.hf_config import hf_config_from_params
from d9d.module.model.qwen3_dense.model import whole_model


def _full_model_keys(params: Qwen3DenseForCausalLMParameters) -> list[str]:
    with torch.device("meta"):
        return list(whole_model(params).state_dict())


def _write(
    params: Qwen3DenseForCausalLMParameters,
    checkpoint: Path,
    folder: Path,
    max_shard_size: int | str,
    dtype: torch.dtype | None,
) -> None:
    problems = check_files(checkpoint, read_manifest(checkpoint)["files"])
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint} failed verification: {problems[0]}")
    specs = model_tensor_specs(checkpoint)
    keys = _full_model_keys(params)
    missing = [k for k in keys if k not in specs]
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint} lacks model tensors {missing[:5]} (another model?)"
        )
    parts = hf_tensor_parts(keys, params.model)
    hf_specs: dict[str, tuple[list[int], torch.dtype]] = {}
    for hf_key, names in parts.items():
        shape = list(specs[names[0]][0])
        shape[0] = sum(specs[n][0][0] for n in names) if len(names) > 1 else shape[0]
        hf_specs[hf_key] = (shape, dtype or specs[names[0]][1])
    sizes = {k: torch.Size(s).numel() * d.itemsize for k, (s, d) in hf_specs.items()}
    shards = plan_shards(sizes, parse_shard_size(max_shard_size))
    files = shard_file_names(len(shards))
    folder.mkdir(parents=True, exist_ok=True)
    stale = [n for n in os.listdir(folder) if n.endswith(".safetensors") or n == SAFETENSORS_INDEX]
    if stale:
        raise ValueError(f"{folder} already holds a checkpoint ({sorted(stale)})")

    def tensors(hf_keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_key in hf_keys:
            pieces = [read_model_tensor(checkpoint, n, *specs[n]) for n in parts[hf_key]]
            tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            del pieces
            yield hf_key, tensor.to(hf_specs[hf_key][1])
            # Drop it before reading the next one: one tensor alive at a time.
            del tensor

    for name, hf_keys in zip(files, shards, strict=True):
        write_safetensors_streaming(
            str(folder / name),
            {k: hf_specs[k] for k in hf_keys},
            tensors(hf_keys),
            metadata={"format": "pt"},
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: n for n, ks in zip(files, shards, strict=True) for k in ks},
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    save_dtype = dtype or next(iter(hf_specs.values()))[1]
    config = hf_config_from_params(params, dtype=save_dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def export_hf_from_checkpoint(
    params: Qwen3DenseForCausalLMParameters,
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes the model of a training checkpoint as an HF folder (rank 0 alone).

    Under ``torch.distributed`` every rank calls it together: rank 0 verifies the
    checkpoint and streams it into the folder, the others wait for its result (a
    broadcast, so a failure on rank 0 is raised on every rank).

    Args:
        params: The model's parameters (as the run trained it).
        checkpoint: A complete training checkpoint folder (``step-<N>``).
        folder: The HF folder to write (must not already hold safetensors files).
        max_shard_size: Largest shard, as ``save_pretrained`` takes it (``"5GB"``).
        dtype: Dtype to write (default: the checkpoint's).

    Returns:
        The folder written.

    Raises:
        CheckpointError: If the checkpoint fails verification or lacks tensors.
        ValueError: If the folder already holds a checkpoint.
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    distributed = dist.is_initialized()
    problem = None
    if not distributed or dist.get_rank() == 0:
        try:
            _write(params, checkpoint, folder, max_shard_size, dtype)
        except (ValueError, OSError) as err:
            problem = (type(err).__name__, str(err))
    if distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        kind, message = problem
        raise (CheckpointError if kind == "CheckpointError" else ValueError)(message)
    return folder
