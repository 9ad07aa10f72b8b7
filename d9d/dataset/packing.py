"""Packing documents into fixed-length training rows.

A row is ``seq_len + 1`` token *slots*; the model reads ``input_ids = slots[:-1]`` and
predicts ``labels = slots[1:]``. Several documents share a row; their ``position_ids``
restart at 0, which is how the model finds the document boundaries (a new document
starts wherever a position does not continue the previous one by +1) and keeps each
token's attention inside its own document.

Strategy: best-fit decreasing over a seeded shuffle. Documents are shuffled, stably
sorted by decreasing length (so the shuffle only breaks ties), and each goes to the open
row with the least free space that still holds it. Best-fit decreasing keeps padding
low (typically a few percent for documents much shorter than a row); the plan reports
``efficiency = num_tokens / num_slots``. Rows are shuffled at the end (same seed), so
that row order does not follow document length.

Documents longer than a row are split into continuation chunks of whole rows that
overlap by one token (chunk ``k`` starts at offset ``k * seq_len``): the last slot of a
row is only ever a label, so with this stride every next-token prediction of the
document is made exactly once, and the chunk's positions continue (``start, start+1,
...``) instead of restarting. The last, shorter chunk is packed like any document.

Within a row, continuation chunks come first, by decreasing start, then whole
documents, then padding (positions ``0, 1, ...``). No two neighbouring segments can then
merge by the +1 rule: a whole document and the padding start at 0, which never
continues anything, and a chunk never directly follows one that ends right before its
start.
"""

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100
"""The label of slots whose next slot is another segment or padding."""


class Segment(NamedTuple):
    """A slice of one document placed in a row.

    Attributes:
        doc_index: Index of the document in the planned corpus.
        start: Offset of the slice inside the document (``> 0`` for a continuation
            chunk); its first token gets position ``start``.
        length: Number of tokens (row slots) of the slice.
    """

    doc_index: int
    start: int
    length: int


class _Rows(Sequence):
    """Read-only view of a plan's rows as tuples of :class:`Segment` (built on access)."""

    def __init__(self, plan: "PackingPlan"):
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        plan = self._plan
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for a plan of {len(self)} rows")
        index %= len(self)
        lo, hi = plan.row_offsets[index], plan.row_offsets[index + 1]
        return tuple(
            Segment(int(d), int(s), int(n))
            for d, s, n in zip(
                plan.doc_index[lo:hi], plan.start[lo:hi], plan.length[lo:hi], strict=True
            )
        )

    def __iter__(self) -> Iterator[tuple[Segment, ...]]:
        return (self[i] for i in range(len(self)))


@dataclasses.dataclass(frozen=True, eq=False)
class PackingPlan:
    """Which document slices fill which row: segments stored flat, in numpy arrays.

    Row ``r`` holds the segments ``row_offsets[r]:row_offsets[r + 1]`` of ``doc_index``,
    ``start`` and ``length``, in slot order; the rest of the row is padding.

    Attributes:
        seq_len: Model sequence length (a row has ``seq_len + 1`` slots).
        row_offsets: ``(num_rows + 1,)`` int64, start of each row's segments.
        doc_index: ``(num_segments,)`` int64, document of each segment.
        start: ``(num_segments,)`` int64, offset of each segment inside its document.
        length: ``(num_segments,)`` int64, tokens of each segment.
    """

    seq_len: int
    row_offsets: np.ndarray
    doc_index: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def rows(self) -> Sequence[tuple[Segment, ...]]:
        """The rows, each a tuple of :class:`Segment` in slot order."""
        return _Rows(self)

    @property
    def num_tokens(self) -> int:
        """Slots holding real tokens (a token shared by two chunks counts twice)."""
        return int(self.length.sum())

    @property
    def num_slots(self) -> int:
        """All slots: ``len(self) * (seq_len + 1)``."""
        return len(self) * (self.seq_len + 1)

    @property
    def efficiency(self) -> float:
        """``num_tokens / num_slots`` (1.0 = no padding; 0.0 for an empty plan)."""
        return self.num_tokens / self.num_slots if self.num_slots else 0.0


def _chunks(doc: int, length: int, capacity: int) -> list[tuple[int, int, int]]:
    # Chunks of a whole row overlap by one token (stride capacity - 1): see module docs.
    chunks, start = [], 0
    while True:
        size = min(capacity, length - start)
        chunks.append((doc, start, size))
        if start + size >= length:
            return chunks
        start += capacity - 1
        if length - start < 2:
            # The rest is one token, already the label of the previous chunk's last slot.
            return chunks


def plan_packed_rows(doc_lengths: Sequence[int], seq_len: int, *, seed: int = 0) -> PackingPlan:
    """Assigns documents to rows of ``seq_len + 1`` slots (best-fit decreasing).

    Deterministic for a given ``doc_lengths``, ``seq_len`` and ``seed``. Empty documents
    are skipped. Runs in about ``O(n log seq_len)`` (a few seconds for a million
    documents).

    Args:
        doc_lengths: Number of tokens of each document.
        seq_len: Model sequence length; a row holds ``seq_len + 1`` tokens.
        seed: Seed of the shuffles (tie order of equal lengths, and row order).

    Returns:
        The plan.

    Raises:
        ValueError: If ``seq_len < 1`` or a length is negative or not an integer.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    lengths = np.asarray(doc_lengths)
    if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
        raise ValueError(
            f"doc_lengths must be a flat sequence of integers, got shape {lengths.shape} "
            f"and dtype {lengths.dtype}"
        )
    lengths = lengths.astype(np.int64)
    if lengths.size and lengths.min() < 0:
        bad = int(np.argmin(lengths))
        raise ValueError(f"doc_lengths[{bad}] is negative ({lengths[bad]})")
    capacity = seq_len + 1
    rng = np.random.default_rng(seed)

    # Whole-row chunks of long documents take a row each; everything else is packed.
    segments: list[tuple[int, int, int]] = []
    for doc in np.flatnonzero(lengths > capacity).tolist():
        segments.extend(_chunks(doc, int(lengths[doc]), capacity))
    whole_rows = [s for s in segments if s[2] == capacity]
    items = [s for s in segments if s[2] != capacity]
    fits = np.flatnonzero((lengths > 0) & (lengths <= capacity))
    item_doc = np.concatenate([np.array([s[0] for s in items], dtype=np.int64), fits])
    item_start = np.concatenate([np.array([s[1] for s in items], dtype=np.int64), 0 * fits])
    item_len = np.concatenate([np.array([s[2] for s in items], dtype=np.int64), lengths[fits]])
    order = rng.permutation(len(item_len))
    order = order[np.argsort(-item_len[order], kind="stable")]

    # Best fit: open rows bucketed by free slots; `free_values` lists the non-empty
    # buckets in increasing order, so the tightest row that fits is one bisect away.
    num_rows = len(whole_rows)
    rows_by_free: dict[int, list[int]] = {}
    free_values: list[int] = []
    item_row = np.empty(len(item_len), dtype=np.int64)
    for item, size in zip(order.tolist(), item_len[order].tolist(), strict=True):
        i = bisect.bisect_left(free_values, size)
        if i == len(free_values):
            row, free = num_rows, capacity
            num_rows += 1
        else:
            free = free_values[i]
            bucket = rows_by_free[free]
            row = bucket.pop()
            if not bucket:
                del rows_by_free[free]
                free_values.pop(i)
        item_row[item] = row
        free -= size
        if free:
            bucket = rows_by_free.get(free)
            if bucket is None:
                rows_by_free[free] = bucket = []
                bisect.insort(free_values, free)
            bucket.append(row)

    seg_doc = np.concatenate([np.array([s[0] for s in whole_rows], dtype=np.int64), item_doc])
    seg_start = np.concatenate([np.array([s[1] for s in whole_rows], dtype=np.int64), item_start])
    seg_len = np.concatenate([np.full(len(whole_rows), capacity, dtype=np.int64), item_len])
    seg_row = np.concatenate([np.arange(len(whole_rows), dtype=np.int64), item_row])
    # Rows in a seeded random order; inside a row: continuation chunks by decreasing
    # start, then whole documents in placement order (see the module docs).
    new_row = rng.permutation(num_rows)[seg_row]
    placement = np.zeros(len(seg_len), dtype=np.int64)
    placement[len(whole_rows) + order] = np.arange(len(order))
    order_in_row = np.lexsort((placement, -seg_start, new_row))
    counts = np.bincount(new_row, minlength=num_rows)
    row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackingPlan(
        seq_len=int(seq_len),
        row_offsets=row_offsets,
        doc_index=seg_doc[order_in_row],
        start=seg_start[order_in_row],
        length=seg_len[order_in_row],
    )


def materialize_rows(
    plan: PackingPlan,
    row_indices: Sequence[int],
    get_tokens: Callable[[int, int, int], Sequence[int] | np.ndarray],
    *,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Builds the model inputs of some rows of ``plan``.

    Args:
        plan: The plan of :func:`plan_packed_rows`.
        row_indices: Rows to build, in batch order.
        get_tokens: ``get_tokens(doc_index, start, length)`` returns that slice of the
            document's token ids (a sequence or numpy array of ``length`` ids).
        pad_id: Token id of padding slots.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``, each ``(len(row_indices),
        seq_len)`` int64. ``labels`` is ``-100`` where the next slot belongs to another
        segment or is padding; padding slots get positions ``0, 1, ...`` (their own
        "document").

    Raises:
        ValueError: If a row index is out of range or ``get_tokens`` returns a slice of
            the wrong length.
    """
    capacity = plan.seq_len + 1
    rows = np.asarray(row_indices, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < -len(plan) or rows.max() >= len(plan)):
        raise ValueError(f"row_indices must lie in [0, {len(plan)}), got {rows.tolist()}")
    rows %= max(len(plan), 1)
    slots = np.full((len(rows), capacity), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), capacity), dtype=np.int64)
    has_label = np.zeros((len(rows), capacity - 1), dtype=bool)
    for out_row, row in enumerate(rows.tolist()):
        offset = 0
        for seg in range(plan.row_offsets[row], plan.row_offsets[row + 1]):
            doc, start, length = (
                int(plan.doc_index[seg]),
                int(plan.start[seg]),
                int(plan.length[seg]),
            )
            tokens = np.asarray(get_tokens(doc, start, length), dtype=np.int64).reshape(-1)
            if len(tokens) != length:
                raise ValueError(
                    f"get_tokens({doc}, {start}, {length}) returned {len(tokens)} tokens, "
                    f"expected {length}"
                )
            span = slice(offset, offset + length)
            slots[out_row, span] = tokens
            positions[out_row, span] = np.arange(start, start + length)
            has_label[out_row, offset : offset + length - 1] = True
            offset += length
        positions[out_row, offset:] = np.arange(capacity - offset)
    slots_t = torch.from_numpy(slots)
    labels = torch.where(torch.from_numpy(has_label), slots_t[:, 1:], IGNORE_INDEX)
    return {
        "input_ids": slots_t[:, :-1].contiguous(),
        "labels": labels,
        "position_ids": torch.from_numpy(positions[:, :-1]).contiguous(),
    }


def pack_documents(
    documents: Sequence[Sequence[int]], seq_len: int, *, seed: int = 0, pad_id: int = 0
) -> tuple[dict[str, torch.Tensor], PackingPlan]:
    """Plans and builds every row of ``documents`` (for corpora that fit in memory).

    Args:
        documents: Token ids of each document.
        seq_len: Model sequence length; a row holds ``seq_len + 1`` tokens.
        seed: Seed of :func:`plan_packed_rows`.
        pad_id: Token id of padding slots.

    Returns:
        ``(batch, plan)``: the batch of :func:`materialize_rows` over all rows, in plan
        order, and the plan.
    """
    plan = plan_packed_rows([len(doc) for doc in documents], seq_len, seed=seed)
    batch = materialize_rows(
        plan,
        range(len(plan)),
        lambda doc, start, length: documents[doc][start : start + length],
        pad_id=pad_id,
    )
    return batch, plan
