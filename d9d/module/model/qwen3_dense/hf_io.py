"""Load Hugging Face Qwen3 safetensors checkpoints into Qwen3 Dense models, and export back.

This file holds what is specific to Qwen3: which checkpoint tensors a model (or pipeline
stage) needs, the checks against ``config.json``, and the tied-embedding policy. The
safetensors folder plumbing (index, streaming reads, shard planning, FSDP2 shards) is
model-agnostic and lives in :mod:`d9d.checkpoint.safetensors_io`; the name mapping in
``hf.py`` and the config conversion in ``hf_config.py``.

A load runs in three phases: :func:`_plan_load` works out which checkpoint tensors this
stage and rank need and checks everything it can (one error lists every missing,
unexpected or mis-shaped tensor) before anything is read; :func:`_read_into` streams those
tensors into the model; :func:`_post_fix` then rebuilds what is not in the checkpoint.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d9d.checkpoint.safetensors_io import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorRead,
    checkpoint_index,
    copy_full_into,
    gather_full,
    read_shapes,
    read_tensors,
    require_safetensors,
    save_safetensors_folder,
)
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
from d9d.module.model.qwen3_dense.model import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    whole_model,
)

__all__ = [
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "Qwen3DenseHFModel",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]

logger = logging.getLogger(__name__)

# Prefixes that wrappers (torch.compile, activation checkpointing, FSDP1) insert into
# state-dict names; the checkpoint uses the unwrapped names (``model.layers.<i>.mlp...``).
_WRAPPER_PREFIXES = re.compile(r"(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
# Old transformers versions saved the RoPE frequencies; they are recomputed here.
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_MAX_LISTED = 20

Qwen3DenseHFModel = Qwen3DenseForCausalLM | Qwen3DenseForClassification


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries under unwrapped names, as the live tensors to copy into."""
    state = model.state_dict(keep_vars=True)
    return {_WRAPPER_PREFIXES.sub("", key): value for key, value in state.items()}


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, Qwen3DenseForCausalLM | Qwen3DenseForClassification):
        raise TypeError(
            "expected a Qwen3DenseForCausalLM or Qwen3DenseForClassification, "
            f"got {type(model).__name__}"
        )


def _describe(model: Qwen3DenseHFModel) -> str:
    stage = model.stage
    return f"{type(model).__name__} (pipeline stage {stage.current_stage} of {stage.num_stages})"


def _full_model_keys(model: Qwen3DenseHFModel) -> list[str]:
    """State-dict names of the single-stage model with the same parameters."""
    # The parameters choose the class (not type(model): FSDP2 swaps the class of a wrapped
    # module for a generated subclass).
    with torch.device("meta"):
        return list(whole_model(model.params).state_dict())


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


# --- load, phase 1: plan ------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadPlan:
    """What one stage on one rank reads from a checkpoint, checked before any data is read.

    Attributes:
        folder: The checkpoint folder.
        index: Checkpoint tensor name -> its file.
        targets: d9d state-dict name (unwrapped) -> the live tensor to fill.
        reads: d9d state-dict name -> the checkpoint tensor (and rows) it is read from.
        tied_source: The LM head is read from ``model.embed_tokens.weight`` (a checkpoint
            saved with ``tie_word_embeddings: true``).
        init_new_head: The head is not read but re-initialised.
    """

    folder: str
    index: dict[str, str]
    targets: dict[str, torch.Tensor]
    reads: dict[str, TensorRead]
    tied_source: bool
    init_new_head: bool


def _is_head(key: str) -> bool:
    return key.startswith(("lm_head.", "cls_head."))


def _plan_load(model: Qwen3DenseHFModel, folder: str, init_new_head: bool) -> _LoadPlan:
    """Maps this stage's tensors to checkpoint tensors and checks config, names and shapes.

    Raises:
        FileNotFoundError: If ``config.json`` or the safetensors files are missing.
        ValueError: If the config does not match the model, the model is on ``meta``, or
            tensors are missing, unexpected or of the wrong shape (all are listed).
    """
    config = read_hf_config(folder)
    _check_config_matches(model, config)
    params = model.params.model
    index = checkpoint_index(folder)
    tied_source = (
        config.get("tie_word_embeddings", False)
        and HF_LM_HEAD_KEY not in index
        and isinstance(model, Qwen3DenseForCausalLM)
        and not init_new_head
    )

    def source(key: str) -> TensorRead:
        return TensorRead(*hf_source_of(key, params, head_from_embedding=tied_source))

    targets = {k: v for k, v in _targets(model).items() if not (init_new_head and _is_head(k))}
    reads = {key: source(key) for key in targets}

    # Unexpected is judged against the whole model, since each stage holds only part of it.
    full_keys = [k for k in _full_model_keys(model) if not (init_new_head and _is_head(k))]
    expected_hf = {source(k).name for k in full_keys}
    ignored = {HF_LM_HEAD_KEY, HF_SCORE_KEY} if init_new_head else set()
    unexpected = sorted(
        k
        for k in index
        if k not in expected_hf and k not in ignored and not _IGNORED_HF_KEYS.match(k)
    )
    missing = sorted({r.name for r in reads.values() if r.name not in index})
    on_meta = sorted(k for k, v in targets.items() if v.device.type == "meta")
    if on_meta:
        raise ValueError(
            "the model has tensors on the meta device; call model.to_empty(device=...) "
            f"before loading:{_listing('on meta', on_meta)}"
        )

    shapes = read_shapes(index, (r.name for r in reads.values() if r.name in index))
    mis_shaped = []
    for key, read in reads.items():
        if read.name not in index:
            continue
        want = tuple(targets[key].shape)
        # A vocabulary split is checked against the whole HF matrix it comes from.
        want_hf = (params.vocab_size, *want[1:]) if read.rows is not None else want
        if shapes[read.name] != want_hf:
            mis_shaped.append(
                f"{read.name}: checkpoint {shapes[read.name]}, model {want_hf} ({key})"
            )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"cannot load HF checkpoint {folder!r} into {_describe(model)}:"
            + (_listing("missing tensors", missing) if missing else "")
            + (_listing("unexpected tensors", unexpected) if unexpected else "")
            + (_listing("shape mismatches", sorted(set(mis_shaped))) if mis_shaped else "")
        )
    return _LoadPlan(folder, index, targets, reads, bool(tied_source), init_new_head)


# --- load, phase 2: read ------------------------------------------------------------------


def _read_into(plan: _LoadPlan) -> None:
    """Streams the planned tensors into the model, cast to each target's dtype.

    The cast and the cut to this rank's FSDP2 shard happen per tensor, so at most one
    checkpoint tensor is held besides the model. A tied head gets its own copy of the
    embedding rows here (it is read separately from the embedding), which unties it.
    """
    for key, value in read_tensors(plan.index, plan.reads):
        copy_full_into(plan.targets[key], value)
        del value  # before the next read, so that only one tensor is held


# --- load, phase 3: post-fix --------------------------------------------------------------


def _post_fix(model: Qwen3DenseHFModel, plan: _LoadPlan) -> None:
    """Rebuilds what the checkpoint does not hold: RoPE tables and, if asked, a new head.

    Also logs, on the last stage, that a tied checkpoint's LM head is now untied.
    """
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingProvider):
            module.reset_parameters()
    if plan.init_new_head and model.stage.is_current_stage_last:
        head = model.lm_head if isinstance(model, Qwen3DenseForCausalLM) else model.cls_head
        head.reset_parameters()
    if plan.tied_source and model.stage.is_current_stage_last:
        logger.warning(
            "%s has tie_word_embeddings=true: the LM head was initialised from a copy of "
            "model.embed_tokens.weight and is trained as a separate (untied) parameter; "
            "save_hf_checkpoint writes both with tie_word_embeddings=false",
            plan.folder,
        )


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
    require_safetensors()
    plan = _plan_load(model, os.fspath(path), init_new_head)
    _read_into(plan)
    _post_fix(model, plan)


# --- export -------------------------------------------------------------------------------


def _hf_tensors(
    targets: dict[str, torch.Tensor], parts: dict[str, list[str]], keys: list[str], dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for hf_key in keys:
        pieces = [gather_full(targets[k]).detach() for k in parts[hf_key]]
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
    require_safetensors()
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
    writer = save_safetensors_folder(
        folder, sizes, max_shard_size, lambda keys: dict(_hf_tensors(targets, parts, keys, dtype))
    )
    if not writer:
        return
    save_dtype = dtype or next(iter(targets.values())).dtype
    config = hf_config_from_params(model.params, dtype=save_dtype, base_config=base_config)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
