"""Dataset-side helpers: pooling masks and document packing."""

from d9d.dataset.packing import (
    PackingPlan,
    Segment,
    materialize_rows,
    pack_documents,
    plan_packed_rows,
)
from d9d.dataset.pooling import token_pooling_mask_from_attention_mask

__all__ = [
    "PackingPlan",
    "Segment",
    "materialize_rows",
    "pack_documents",
    "plan_packed_rows",
    "token_pooling_mask_from_attention_mask",
]
