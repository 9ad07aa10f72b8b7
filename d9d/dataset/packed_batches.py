"""Packed, sharded, resumable global batches of a corpus.

Every document keeps its end-of-document id, and the documents are packed into rows of
``seq_len + 1`` tokens by ``d9d.dataset.packing`` (positions restart with each document,
so packed documents do not attend to each other). The plan is made once from the seed;
each epoch visits its rows in a new order, a permutation drawn from ``(seed, epoch)``. A
*global* batch is ``global_batch_size`` consecutive rows of that order, and data-parallel
rank ``r`` of ``n`` takes the ``r``-th of its ``n`` equal slices, so the cursor (epoch,
batch) means the same under every layout.
"""

from collections.abc import Iterator

import torch

from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.packing import materialize_rows, plan_packed_rows


class PackedBatches:
    """Global batches of packed rows, this data-parallel rank's slice, with a cursor.

    Iterating never ends: after the last full batch of an epoch the next epoch starts
    with a new row order. ``state_dict()`` after ``k`` batches, loaded into a new
    instance over the same corpus and settings (any data-parallel layout), continues
    with batch ``k + 1``.
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
    ):
        """Plans the packing.

        Args:
            corpus: The documents.
            seq_len: Tokens per row fed to the model (rows hold ``seq_len + 1``).
            global_batch_size: Rows per step over all data-parallel ranks.
            dp_rank: This process's data-parallel rank.
            dp_size: Number of data-parallel ranks (must divide ``global_batch_size``).
            seed: Seeds the packing plan and the epoch orders.
            pad_id: Id of unused slots (their labels are -100).

        Raises:
            ValueError: If the batch does not split over the ranks or the corpus holds
                fewer rows than one global batch.
        """
        if global_batch_size % dp_size:
            raise ValueError(
                f"data.global_batch_size={global_batch_size} does not split over "
                f"{dp_size} data-parallel ranks"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.corpus = corpus
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.pad_id = pad_id
        self.plan = plan_packed_rows(corpus.doc_lengths.tolist(), seq_len, seed=seed)
        self.batches_per_epoch = len(self.plan) // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the corpus is smaller than one batch: {len(corpus)} documents, "
                f"{corpus.num_tokens} tokens pack into {len(self.plan)} rows of seq_len+1="
                f"{seq_len + 1}, but data.global_batch_size={global_batch_size} rows are needed"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.plan), generator=generator)
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch.

        Returns:
            ``input_ids``, ``labels`` and ``position_ids``, each ``(local_batch, seq_len)``
            int64.
        """
        order = self._epoch_order()
        first = self.batch_in_epoch * self.global_batch_size + self.dp_rank * self.local_batch_size
        rows = order[first : first + self.local_batch_size].tolist()
        batch = materialize_rows(self.plan, rows, self.corpus.get_tokens, pad_id=self.pad_id)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The cursor plus what it is only valid for (seed, shapes, plan size)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_rows": len(self.plan),
            "num_documents": len(self.corpus),
        }

    def load_state_dict(self, state: dict) -> None:
        """Moves the cursor to ``state``'s.

        Raises:
            ValueError: If ``state`` was saved over other data or settings.
        """
        mine = self.state_dict()
        different = [
            f"{key}: saved {state.get(key)!r}, now {mine[key]!r}"
            for key in ("seed", "seq_len", "global_batch_size", "num_rows", "num_documents")
            if state.get(key) != mine[key]
        ]
        if different:
            raise ValueError(
                "the data cursor was saved for other data or settings: " + "; ".join(different)
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._order = None
