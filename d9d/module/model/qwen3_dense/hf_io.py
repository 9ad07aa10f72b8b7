"""Load Hugging Face Qwen3 safetensors checkpoints into Qwen3 Dense models, and export back.

Reading and writing need the optional ``safetensors`` package (``pip install 'd9d[hf]'``).

Tied embeddings. An HF checkpoint saved with ``tie_word_embeddings: true`` (Qwen3-0.6B,
1.7B, 4B) stores only ``model.embed_tokens.weight``. Here the LM head is *initialised
from a copy* of that matrix and trained as its own parameter: pipeline parallelism puts
the embedding on the first stage and the head on the last, and FSDP2 shards them as
separate units, so real sharing would need a cross-stage gradient exchange this stack
does not do. Training therefore unties them, and :func:`save_hf_checkpoint` writes both
tensors with ``tie_word_embeddings: false``.
"""

import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from d9d.module.block.rope import RotaryEmbeddingProvider
from d9d.module.model.qwen3_dense.hf import (
    HF_LM_HEAD_KEY,
    HF_SCORE_KEY,
    hf_source_of,
    hf_tensor_parts,
)
from d9d.module.model.qwen3_dense.hf_config import (
    backbone_params_from_hf_config,
    hf_config_from_params,
    read_hf_config,
)
from d9d.module.model.qwen3_dense.model import Qwen3DenseForCausalLM, Qwen3DenseForClassification
from d9d.pipelining.api import PipelineStageInfo

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Prefixes that wrappers (torch.compile, activation checkpointing, FSDP1) insert into
# state-dict names; the checkpoint format is the unwrapped SPEC names.
_WRAPPER_PREFIXES = re.compile(r"(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
# Old transformers versions saved the RoPE frequencies; they are recomputed here.
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_MAX_LISTED = 20

Qwen3DenseHFModel = Qwen3DenseForCausalLM | Qwen3DenseForClassification


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(
            "reading or writing Hugging Face checkpoints needs the optional 'safetensors' "
            "package: pip install 'd9d[hf]'"
        ) from err
    return safetensors


def _safe_open(path: str):
    # One indirection so that tests can observe which tensors each stage reads.
    return _safetensors().safe_open(path, framework="pt", device="cpu")


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries under SPEC names, as the live tensors to copy into."""
    state = model.state_dict(keep_vars=True)
    return {_WRAPPER_PREFIXES.sub("", key): value for key, value in state.items()}


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, Qwen3DenseForCausalLM | Qwen3DenseForClassification):
        raise TypeError(
            "expected a Qwen3DenseForCausalLM or Qwen3DenseForClassification, "
            f"got {type(model).__name__}"
        )


def _full_model_keys(model: Qwen3DenseHFModel) -> list[str]:
    """State-dict names of the single-stage model with the same parameters."""
    # Not type(model): FSDP2 swaps the class of a wrapped module for a generated subclass.
    causal = isinstance(model, Qwen3DenseForCausalLM)
    cls = Qwen3DenseForCausalLM if causal else Qwen3DenseForClassification
    with torch.device("meta"):
        full = cls(model.params, PipelineStageInfo(0, 1), "no", False)
    return list(full.state_dict())


def _checkpoint_index(folder: str) -> dict[str, str]:
    """Maps every tensor name of the checkpoint to the file (in ``folder``) holding it."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    if os.path.isfile(single_path):
        with _safe_open(single_path) as f:
            return dict.fromkeys(f.keys(), single_path)
    raise FileNotFoundError(
        f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in {folder!r} "
        f"(found: {sorted(os.listdir(folder))})"
    )


def _check_config_matches(model: Qwen3DenseHFModel, config: dict[str, Any]) -> None:
    # Shapes alone miss rope_base, rms_norm_eps and some head layouts; compare the maths.
    params = model.params.model
    from_hf = backbone_params_from_hf_config(
        config,
        split_vocab_size=params.split_vocab_size,
        split_vocab_order=params.split_vocab_order,
        max_position_ids=params.max_position_ids,
    )
    ours, theirs = params.model_dump(), from_hf.model_dump()
    diffs = [
        f"layer.{name}: model {value} vs checkpoint {theirs['layer'][name]}"
        for name, value in ours["layer"].items()
        if theirs["layer"][name] != value
    ]
    diffs += [
        f"{name}: model {ours[name]} vs checkpoint {theirs[name]}"
        for name in ("num_hidden_layers", "rope_base")
        if ours[name] != theirs[name]
    ]
    if diffs:
        raise ValueError(
            "the model's parameters do not match the checkpoint's config.json: " + "; ".join(diffs)
        )


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


@torch.no_grad()
def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    value = value.to(dtype=target.dtype)
    if isinstance(target, DTensor):
        # Every rank read the same full tensor, so each can cut its own shard locally:
        # src_data_rank=None skips the broadcast.
        value = distribute_tensor(
            value.to(target.to_local().device),
            target.device_mesh,
            target.placements,
            src_data_rank=None,
        )
    else:
        value = value.to(target.device)
    target.copy_(value)


def load_hf_checkpoint(
    model: Qwen3DenseHFModel, path: str | os.PathLike, *, init_new_head: bool = False
) -> None:
    """Loads an HF Qwen3 safetensors checkpoint into this pipeline stage, in place.

    Works on any pipeline stage (only the tensors this stage owns are read), on a model
    whose parameters are FSDP2 ``DTensor`` shards (every rank reads each tensor it needs
    and keeps only its own shard), and on models wrapped by the compile layer (names are
    matched after removing wrapper prefixes). The folder is read shard file by shard file
    and tensor by tensor, so at most one checkpoint tensor is held besides the model.
    Values are cast to each parameter's dtype. The RoPE tables are rebuilt afterwards, so
    a model built on ``meta`` and moved with ``to_empty`` needs no ``reset_parameters()``.

    Tied embeddings (``tie_word_embeddings: true`` and no ``lm_head.weight`` in the
    files): the LM head is initialised from a copy of ``model.embed_tokens.weight`` and
    trained separately from it (untied; see the module docstring).

    Args:
        model: A ``Qwen3DenseForCausalLM`` / ``Qwen3DenseForClassification`` stage, on a
            real device (not ``meta``).
        path: The checkpoint folder: ``config.json`` plus ``model.safetensors`` or
            ``model.safetensors.index.json`` with its shards.
        init_new_head: Start a new head instead of loading one: the stage's head
            (``lm_head`` / ``cls_head``) is re-initialised with its ``reset_parameters()``
            and the checkpoint's heads (``lm_head.weight``, ``score.weight``) are ignored.
            Use it to train a classifier from a causal-LM checkpoint.

    Raises:
        ImportError: If ``safetensors`` is not installed.
        FileNotFoundError: If the folder lacks ``config.json`` or the safetensors files.
        ValueError: If the config does not match the model, or tensors are missing,
            unexpected or of the wrong shape (all of them are listed); nothing is copied
            in that case.
    """
    _check_model(model)
    _safetensors()
    folder = os.fspath(path)
    config = read_hf_config(folder)
    _check_config_matches(model, config)
    params = model.params.model
    index = _checkpoint_index(folder)
    tied_source = (
        config.get("tie_word_embeddings", False)
        and HF_LM_HEAD_KEY not in index
        and isinstance(model, Qwen3DenseForCausalLM)
        and not init_new_head
    )

    def is_head(key: str) -> bool:
        return key.startswith(("lm_head.", "cls_head."))

    targets = {k: v for k, v in _targets(model).items() if not (init_new_head and is_head(k))}
    full_keys = [k for k in _full_model_keys(model) if not (init_new_head and is_head(k))]
    sources = {key: hf_source_of(key, params, head_from_embedding=tied_source) for key in targets}

    expected_hf = {hf_source_of(k, params, head_from_embedding=tied_source)[0] for k in full_keys}
    ignored = {HF_LM_HEAD_KEY, HF_SCORE_KEY} if init_new_head else set()
    unexpected = sorted(
        k
        for k in index
        if k not in expected_hf and k not in ignored and not _IGNORED_HF_KEYS.match(k)
    )
    missing = sorted({hf for hf, _ in sources.values() if hf not in index})
    on_meta = sorted(k for k, v in targets.items() if v.device.type == "meta")
    if on_meta:
        raise ValueError(
            "the model has tensors on the meta device; call model.to_empty(device=...) "
            f"before loading:{_listing('on meta', on_meta)}"
        )

    by_file: dict[str, list[str]] = {}
    for key, (hf_key, _) in sources.items():
        if hf_key in index:
            by_file.setdefault(index[hf_key], []).append(key)

    mis_shaped = []
    for file, keys in by_file.items():
        with _safe_open(file) as f:
            for key in keys:
                hf_key, rows = sources[key]
                hf_shape = tuple(f.get_slice(hf_key).get_shape())
                want = tuple(targets[key].shape)
                # A vocabulary split is checked against the whole HF matrix it comes from.
                want_hf = (params.vocab_size, *want[1:]) if rows is not None else want
                if hf_shape != want_hf:
                    mis_shaped.append(f"{hf_key}: checkpoint {hf_shape}, model {want_hf} ({key})")
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"cannot load HF checkpoint {folder!r} into {_describe(model)}:"
            + (_listing("missing tensors", missing) if missing else "")
            + (_listing("unexpected tensors", unexpected) if unexpected else "")
            + (_listing("shape mismatches", sorted(set(mis_shaped))) if mis_shaped else "")
        )

    for file, keys in by_file.items():
        with _safe_open(file) as f:
            for key in keys:
                hf_key, rows = sources[key]
                if rows is None:
                    value = f.get_tensor(hf_key)
                else:
                    value = f.get_slice(hf_key)[rows[0] : rows[1]]
                _copy_into(targets[key], value)
                del value

    for module in model.modules():
        if isinstance(module, RotaryEmbeddingProvider):
            module.reset_parameters()
    if init_new_head and model.stage.is_current_stage_last:
        head = model.lm_head if isinstance(model, Qwen3DenseForCausalLM) else model.cls_head
        head.reset_parameters()
    if tied_source and model.stage.is_current_stage_last:
        logger.warning(
            "%s has tie_word_embeddings=true: the LM head was initialised from a copy of "
            "model.embed_tokens.weight and is trained as a separate (untied) parameter; "
            "save_hf_checkpoint writes both with tie_word_embeddings=false",
            folder,
        )


def _describe(model: Qwen3DenseHFModel) -> str:
    stage = model.stage
    return f"{type(model).__name__} (pipeline stage {stage.current_stage} of {stage.num_stages})"


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _full(value: torch.Tensor) -> torch.Tensor:
    # A collective for DTensors: every rank must reach it in the same order.
    return value.full_tensor() if isinstance(value, DTensor) else value


def _hf_tensors(
    targets: dict[str, torch.Tensor], parts: dict[str, list[str]], keys: list[str], dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for hf_key in keys:
        pieces = [_full(targets[k]).detach() for k in parts[hf_key]]
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        yield hf_key, tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()


def save_hf_checkpoint(
    model: Qwen3DenseHFModel,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    base_config: dict[str, Any] | None = None,
) -> None:
    """Exports a full model as an HF Qwen3 (causal LM or sequence classification) folder.

    Writes ``config.json`` and either ``model.safetensors`` or numbered shards plus
    ``model.safetensors.index.json``, loadable with ``from_pretrained(path)``. Only one
    shard's worth of full tensors is held at a time. The LM head is always written
    (``tie_word_embeddings: false``, see the module docstring).

    FSDP2: if parameters are ``DTensor`` shards, every rank must call this function (each
    tensor is gathered with ``full_tensor()``, a collective); only rank 0 writes files.

    Args:
        model: A single-stage model (``PipelineStageInfo(0, 1)``), possibly FSDP2-wrapped.
        path: Output folder (created if needed). It must not already hold a safetensors
            checkpoint, so that stale shards cannot mix with new ones.
        max_shard_size: Largest shard in bytes, or a string like ``"5GB"``/``"500MB"``
            (decimal units; ``"GiB"``/``"MiB"`` binary). A single larger tensor gets its
            own shard.
        dtype: Dtype to save in (default: each parameter's own dtype).
        base_config: Config of the source checkpoint (e.g. from
            :func:`~d9d.module.model.qwen3_dense.hf_config.read_hf_config`) whose
            non-architecture fields (token ids, label names) are kept.

    Raises:
        ImportError: If ``safetensors`` is not installed.
        ValueError: If the model is one stage of several, or the folder already holds a
            checkpoint.
    """
    _check_model(model)
    st = _safetensors()
    if model.stage.num_stages != 1:
        raise ValueError(
            f"save_hf_checkpoint needs the full model, got {_describe(model)}; build a "
            "single-stage model and load each stage's state dict into it"
        )
    folder = os.fspath(path)
    targets = _targets(model)
    parts = hf_tensor_parts(list(targets), model.params.model)
    sizes = {}
    for hf_key, keys in parts.items():
        numel = sum(targets[k].numel() for k in keys)
        sizes[hf_key] = numel * (dtype or targets[keys[0]].dtype).itemsize
    shards = _plan_shards(sizes, _parse_size(max_shard_size))
    names = (
        [SAFETENSORS_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    distributed = dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    problem = [None]
    if writer:
        os.makedirs(folder, exist_ok=True)
        stale = [
            n for n in os.listdir(folder) if n.endswith(".safetensors") or n == SAFETENSORS_INDEX
        ]
        if stale:
            problem[0] = f"{folder!r} already holds a checkpoint ({sorted(stale)})"
    if distributed:
        # Every rank must stop together, or the others would wait in full_tensor() forever.
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(problem[0])
    for name, keys in zip(names, shards, strict=True):
        tensors = dict(_hf_tensors(targets, parts, keys, dtype))
        if writer:
            st.torch.save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        del tensors
    if not writer:
        return
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {
                key: name for name, keys in zip(names, shards, strict=True) for key in keys
            },
        }
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    save_dtype = dtype or next(iter(targets.values())).dtype
    config = hf_config_from_params(model.params, dtype=save_dtype, base_config=base_config)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
