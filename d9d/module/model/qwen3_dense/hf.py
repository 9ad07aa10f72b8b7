"""Mapping between d9d state-dict names and HF ``transformers`` Qwen3 names.

HF keeps one embedding matrix and one LM head; d9d keeps one tensor per vocabulary split.
Splits are rows of the HF matrices, contiguous in ``split_vocab_order``. Every other name
is identical (``model.layers.<i>...``, ``model.norm.weight``); the classification head is
``cls_head.score.weight`` here and ``score.weight`` in HF.
"""

import torch

from d9d.module.model.qwen3_dense.params import Qwen3DenseParameters

_HF_EMBED = "model.embed_tokens.weight"
_HF_LM_HEAD = "lm_head.weight"
_HF_SCORE = "score.weight"
_D9D_SCORE = "cls_head.score.weight"


def _split_rows(tensor: torch.Tensor, params: Qwen3DenseParameters) -> dict[str, torch.Tensor]:
    sizes = [params.split_vocab_size[name] for name in params.split_vocab_order]
    if tensor.shape[0] != sum(sizes):
        raise ValueError(
            f"vocabulary tensor has {tensor.shape[0]} rows, expected {sum(sizes)} "
            f"(split_vocab_size={params.split_vocab_size})"
        )
    return dict(zip(params.split_vocab_order, torch.split(tensor, sizes, dim=0), strict=True))


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
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state_dict.items():
        if key == _HF_EMBED:
            for name, part in _split_rows(value, params).items():
                out[f"model.embed_tokens.token_embedding.{name}.weight"] = part
        elif key == _HF_LM_HEAD:
            for name, part in _split_rows(value, params).items():
                out[f"lm_head.lm_head.{name}.weight"] = part
        elif key == _HF_SCORE:
            out[_D9D_SCORE] = value
        else:
            out[key] = value
    return out


def state_dict_to_hf(
    state_dict: dict[str, torch.Tensor], params: Qwen3DenseParameters
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_from_hf`: concatenates splits and renames to HF names."""
    out: dict[str, torch.Tensor] = {}
    embed: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("model.embed_tokens.token_embedding."):
            embed[key.split(".")[3]] = value
        elif key.startswith("lm_head.lm_head."):
            head[key.split(".")[2]] = value
        elif key == _D9D_SCORE:
            out[_HF_SCORE] = value
        else:
            out[key] = value
    for parts, hf_key in ((embed, _HF_EMBED), (head, _HF_LM_HEAD)):
        if parts:
            out[hf_key] = torch.cat([parts[name] for name in params.split_vocab_order], dim=0)
    return out
