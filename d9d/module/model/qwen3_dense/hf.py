"""Mapping between d9d state-dict names and HF ``transformers`` Qwen3 names.

HF keeps one embedding matrix and one LM head; d9d keeps one tensor per vocabulary split.
Splits are rows of the HF matrices, contiguous in ``split_vocab_order``. Every other name
is identical (``model.layers.<i>...``, ``model.norm.weight``); the classification head is
``cls_head.score.weight`` here and ``score.weight`` in HF.

Whole-dict conversion (:func:`state_dict_from_hf`, :func:`state_dict_to_hf`) suits small
models in memory; :func:`hf_source_of` and :func:`hf_tensor_parts` map one name at a time
for the streaming reader and writer in ``hf_io.py``. ``hf_config.py`` converts
``config.json``.
"""

import torch

from d9d.module.model.qwen3_dense.params import Qwen3DenseParameters

_HF_EMBED = "model.embed_tokens.weight"
_HF_LM_HEAD = "lm_head.weight"
_HF_SCORE = "score.weight"
_D9D_SCORE = "cls_head.score.weight"


HF_LM_HEAD_KEY = _HF_LM_HEAD
HF_SCORE_KEY = _HF_SCORE

_D9D_EMBED_PREFIX = "model.embed_tokens.token_embedding."
_D9D_LM_HEAD_PREFIX = "lm_head.lm_head."


def _split_row_ranges(params: Qwen3DenseParameters) -> dict[str, tuple[int, int]]:
    ranges = {}
    offset = 0
    for name in params.split_vocab_order:
        size = params.split_vocab_size[name]
        ranges[name] = (offset, offset + size)
        offset += size
    return ranges


def hf_source_of(
    key: str, params: Qwen3DenseParameters, head_from_embedding: bool = False
) -> tuple[str, tuple[int, int] | None]:
    """Where one d9d state-dict entry lives in an HF checkpoint.

    Args:
        key: A d9d state-dict name (``model.layers.<i>...``, no wrapper prefixes such as
            ``_orig_mod.``).
        params: The backbone parameters (for the vocabulary splits).
        head_from_embedding: Read the LM head splits from ``model.embed_tokens.weight``
            (an HF checkpoint saved with ``tie_word_embeddings: true`` has no
            ``lm_head.weight``).

    Returns:
        ``(hf_name, rows)`` where ``rows`` is the ``[start, end)`` row range of the HF
        tensor that holds this vocabulary split, or ``None`` for the whole tensor.

    Raises:
        ValueError: If ``key`` names a vocabulary split that ``params`` does not have.
    """
    for prefix, hf_key in ((_D9D_EMBED_PREFIX, _HF_EMBED), (_D9D_LM_HEAD_PREFIX, _HF_LM_HEAD)):
        if key.startswith(prefix) and key.endswith(".weight"):
            split = key[len(prefix) : -len(".weight")]
            ranges = _split_row_ranges(params)
            if split not in ranges:
                raise ValueError(
                    f"{key!r} names vocabulary split {split!r}, which is not in "
                    f"split_vocab_order {params.split_vocab_order}"
                )
            if hf_key == _HF_LM_HEAD and head_from_embedding:
                hf_key = _HF_EMBED
            return hf_key, ranges[split]
    if key == _D9D_SCORE:
        return _HF_SCORE, None
    return key, None


def hf_tensor_parts(keys: list[str], params: Qwen3DenseParameters) -> dict[str, list[str]]:
    """Groups d9d state-dict names by the HF tensor they form (export direction).

    Args:
        keys: d9d state-dict names of a full (single-stage) model.
        params: The backbone parameters (for the vocabulary splits).

    Returns:
        An ordered mapping from HF name to the d9d names whose row-wise concatenation, in
        this order, is that HF tensor (one name for everything but the vocabulary tensors).
    """
    out: dict[str, list[str]] = {}
    order = {name: i for i, name in enumerate(params.split_vocab_order)}
    for key in keys:
        hf_key, _ = hf_source_of(key, params)
        out.setdefault(hf_key, []).append(key)
    for hf_key in (_HF_EMBED, _HF_LM_HEAD):
        if hf_key in out:
            prefix = _D9D_EMBED_PREFIX if hf_key == _HF_EMBED else _D9D_LM_HEAD_PREFIX
            out[hf_key].sort(key=lambda k, p=prefix: order[k[len(p) : -len(".weight")]])
    return out


def _d9d_keys_of(hf_key: str, params: Qwen3DenseParameters) -> list[str]:
    if hf_key == _HF_EMBED:
        return [f"{_D9D_EMBED_PREFIX}{name}.weight" for name in params.split_vocab_order]
    if hf_key == _HF_LM_HEAD:
        return [f"{_D9D_LM_HEAD_PREFIX}{name}.weight" for name in params.split_vocab_order]
    return [_D9D_SCORE if hf_key == _HF_SCORE else hf_key]


def state_dict_from_hf(
    hf_state_dict: dict[str, torch.Tensor], params: Qwen3DenseParameters
) -> dict[str, torch.Tensor]:
    """Renames (and splits by vocabulary) an HF Qwen3 state dict into d9d names.

    Args:
        hf_state_dict: Tensors named as in HF ``Qwen3ForCausalLM`` or
            ``Qwen3ForSequenceClassification``.
        params: The backbone parameters (for the vocabulary splits).

    Returns:
        A state dict loadable into ``Qwen3DenseForCausalLM`` /
        ``Qwen3DenseForClassification``.

    Raises:
        ValueError: If a vocabulary tensor's row count is not the total split size.
    """
    vocab_size = params.vocab_size
    out: dict[str, torch.Tensor] = {}
    for hf_key, value in hf_state_dict.items():
        if hf_key in (_HF_EMBED, _HF_LM_HEAD) and value.shape[0] != vocab_size:
            raise ValueError(
                f"vocabulary tensor {hf_key!r} has {value.shape[0]} rows, expected "
                f"{vocab_size} (split_vocab_size={params.split_vocab_size})"
            )
        for key in _d9d_keys_of(hf_key, params):
            _, rows = hf_source_of(key, params)
            out[key] = value if rows is None else value[rows[0] : rows[1]]
    return out


def state_dict_to_hf(
    state_dict: dict[str, torch.Tensor], params: Qwen3DenseParameters
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_from_hf`: concatenates splits and renames to HF names."""
    out: dict[str, torch.Tensor] = {}
    for hf_key, keys in hf_tensor_parts(list(state_dict), params).items():
        parts = [state_dict[key] for key in keys]
        out[hf_key] = parts[0] if hf_key not in (_HF_EMBED, _HF_LM_HEAD) else torch.cat(parts)
    return out
