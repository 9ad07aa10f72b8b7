"""The held-out set: documents split off the training corpus, and its evaluation batches.

:func:`split_heldout` decides which documents are held out from the document indices
and the seed alone (a seeded permutation; the first ``round(fraction * n)`` documents of
it are held out), so every rank of every layout computes the same split and no document
is on both sides. :class:`HeldOutBatches` packs the held-out documents exactly like the
training data (``d9d.dataset.packing``: documents never attend to each other) and walks
a fixed, seeded order of its rows, the same at every evaluation, so evaluations of one
run are comparable and need no cursor in a checkpoint.
"""

from collections.abc import Iterator

import numpy as np
import torch

from d9d.core.constants import IGNORE_INDEX
from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.packing import materialize_rows, plan_packed_rows

# Mixed into the seed so that the split's permutation and the eval row order are not
# the training data's own draws of the same seed.
_SPLIT_STREAM = 0x6576616C  # "eval"
_ORDER_STREAM = 0x726F7773  # "rows"


def split_heldout(
    corpus: DocumentCorpus, fraction: float, seed: int
) -> tuple[DocumentCorpus, DocumentCorpus]:
    """Splits ``corpus`` into training and held-out documents.

    Args:
        corpus: All documents.
        fraction: Share of the documents held out, in ``(0, 1)``.
        seed: The run's seed.

    Returns:
        ``(training, held_out)``; each keeps the corpus's document order.

    Raises:
        ValueError: If ``fraction`` is not in ``(0, 1)``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    num_documents = len(corpus)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_STREAM)
    permutation = torch.randperm(num_documents, generator=generator).numpy()
    num_held_out = round(fraction * num_documents)
    held_out = np.sort(permutation[:num_held_out])
    training = np.sort(permutation[num_held_out:])
    return corpus.subset(training), corpus.subset(held_out)


def _padding_rows(rows: int, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    # Rows with nothing to predict (every label ignored), so that the last global batch
    # of the held-out set has the shape every batch must have.
    return {
        "input_ids": torch.full((rows, seq_len), pad_id, dtype=torch.int64),
        "labels": torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.int64),
        "position_ids": torch.arange(seq_len, dtype=torch.int64).expand(rows, seq_len).clone(),
    }


class HeldOutBatches:
    """One pass over the packed held-out rows, in global batches, this rank's slice.

    Global batch ``b`` is rows ``b * global_batch_size ...`` of a seeded order of the
    rows (the same under every layout), and data-parallel rank ``r`` of ``n`` takes the
    ``r``-th of its ``n`` equal slices: each rank evaluates its own share. The last
    global batch is completed with rows that predict nothing, so the whole set is
    evaluated and every batch has the training batch's shape.

    Attributes:
        plan: The packing plan of the held-out documents.
        num_batches: Global batches one pass yields.
        total_batches: Global batches of the whole held-out set.
    """

    def __init__(
        self,
        corpus: DocumentCorpus,
        seq_len: int,
        global_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        pad_id: int = 0,
        max_batches: int | None = None,
        source: str = "the held-out set",
    ):
        """Plans the packing of the held-out documents.

        Args:
            corpus: The held-out documents.
            seq_len: Tokens per row fed to the model.
            global_batch_size: Rows per batch over all data-parallel ranks.
            dp_rank: This process's data-parallel rank.
            dp_size: Number of data-parallel ranks (must divide ``global_batch_size``).
            seed: Seeds the packing plan and the row order.
            pad_id: Id of unused slots.
            max_batches: Evaluate at most this many global batches (``None``: all).
            source: Names the held-out set in error messages (e.g. the config key).

        Raises:
            ValueError: If the held-out set holds fewer rows than one global batch, or
                the batch does not split over the ranks.
        """
        if global_batch_size % dp_size:
            raise ValueError(
                f"global batch of {global_batch_size} rows does not split over {dp_size} ranks"
            )
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.pad_id = pad_id
        self.corpus = corpus
        lengths = corpus.doc_lengths.tolist()
        self.plan = plan_packed_rows(lengths, seq_len, seed=seed) if lengths else None
        num_rows = len(self.plan) if self.plan is not None else 0
        if num_rows < global_batch_size:
            raise ValueError(
                f"{source} is smaller than one batch: {len(corpus)} documents, "
                f"{corpus.num_tokens} tokens pack into {num_rows} rows of seq_len+1="
                f"{seq_len + 1}, but data.global_batch_size={global_batch_size} rows are needed"
            )
        generator = torch.Generator().manual_seed(seed * 1_000_003 + _ORDER_STREAM)
        self._order = torch.randperm(num_rows, generator=generator)
        self.total_batches = -(-num_rows // global_batch_size)
        self.num_batches = min(self.total_batches, max_batches or self.total_batches)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's rows of global batch ``index``.

        Returns:
            ``input_ids``, ``labels`` and ``position_ids``, each ``(local_batch, seq_len)``
            int64.
        """
        if not 0 <= index < self.total_batches:
            raise IndexError(f"batch {index} outside [0, {self.total_batches})")
        first = index * self.global_batch_size + self.dp_rank * self.local_batch_size
        rows = self._order[first : first + self.local_batch_size].tolist()
        batch = materialize_rows(self.plan, rows, self.corpus.get_tokens, pad_id=self.pad_id)
        missing = self.local_batch_size - len(rows)
        if missing:
            padding = _padding_rows(missing, self.seq_len, self.pad_id)
            batch = {key: torch.cat([batch[key], padding[key]]) for key in batch}
        return batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in range(self.num_batches):
            yield self.batch(index)
