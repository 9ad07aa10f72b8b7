"""Dataset-side helpers."""

from d9d.dataset.pooling import token_pooling_mask_from_attention_mask

__all__ = ["token_pooling_mask_from_attention_mask"]
