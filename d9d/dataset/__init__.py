"""Dataset-side pieces: tokenizers, token files, corpora, packing, batches, pooling masks.

One file each: ``tokenizers.py`` (byte level, HF ``tokenizer.json``), ``token_files.py``
(memory-mapped ``.npy`` / ``.bin`` ids), ``text_files.py`` (text tokenized once into a
cached token file; the standard-library corpus), ``corpus.py`` (documents of several
token files), ``packing.py`` (documents into rows), ``packed_batches.py`` (packed,
sharded, resumable global batches), ``heldout.py`` (the held-out split and its evaluation
batches) and ``pooling.py`` (classification pooling masks).
"""

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
