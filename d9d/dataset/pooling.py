"""Pooling masks for classification heads."""

import torch


def token_pooling_mask_from_attention_mask(
    attention_mask: torch.Tensor, pooling_type: str
) -> torch.Tensor:
    """Builds a ``(batch, seq)`` 0/1 mask choosing which tokens a classifier reads.

    Args:
        attention_mask: ``(batch, seq)`` mask, 1 for real tokens; right padding assumed.
        pooling_type: ``"first"`` (token 0), ``"last"`` (the last real token) or ``"all"``
            (every real token).

    Returns:
        A mask with the dtype of ``attention_mask``.

    Raises:
        ValueError: For an unknown ``pooling_type`` or a mask that is not 2-D.
    """
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}"
        )
    if pooling_type == "all":
        return attention_mask.clone()
    out = torch.zeros_like(attention_mask)
    if pooling_type == "first":
        out[:, 0] = 1
    elif pooling_type == "last":
        last = attention_mask.sum(dim=1).long() - 1
        if (last < 0).any():
            raise ValueError("pooling_type 'last' needs at least one real token per row")
        out[torch.arange(out.shape[0], device=out.device), last] = 1
    else:
        raise ValueError(
            f"unknown pooling_type {pooling_type!r}; expected 'first', 'last' or 'all'"
        )
    return out
