"""The held-out split and its batches: disjoint, seeded, packed, one share per rank."""

import numpy as np
import pytest
import torch

from d9d.core.constants import IGNORE_INDEX
from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.heldout import HeldOutBatches, split_heldout
from d9d.dataset.token_files import open_token_file, write_token_file

SEQ = 16
BATCH = 4


def _corpus(tmp_path, n=60) -> DocumentCorpus:
    rng = np.random.default_rng(0)
    # Document i holds the id i + 1 only (every document is recognisable in a row).
    docs = [np.full(int(rng.integers(3, 40)), i + 1) for i in range(n)]
    path = write_token_file(tmp_path / "docs.bin", docs, eos_id=0, vocab_size=n + 1)
    return DocumentCorpus([open_token_file(path, None)])


def _ids(corpus: DocumentCorpus) -> list[int]:
    return [int(corpus.get_tokens(i, 0, 1)[0]) for i in range(len(corpus))]


def test_split_is_disjoint_complete_and_seeded(tmp_path):
    corpus = _corpus(tmp_path)
    train, held = split_heldout(corpus, 0.25, seed=3)
    train_ids, held_ids = _ids(train), _ids(held)
    assert len(held_ids) == 15 and len(train_ids) == 45
    assert not set(train_ids) & set(held_ids)
    assert sorted(train_ids + held_ids) == _ids(corpus)
    # Each side keeps the corpus's document order; its lengths follow its documents.
    assert train_ids == sorted(train_ids) and held_ids == sorted(held_ids)
    assert held.num_tokens == sum(int(corpus.doc_lengths[i - 1]) for i in held_ids)
    # The rule reads only the document indices and the seed.
    assert _ids(split_heldout(corpus, 0.25, seed=3)[1]) == held_ids
    assert _ids(split_heldout(corpus, 0.25, seed=4)[1]) != held_ids
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        split_heldout(corpus, 1.0, seed=3)


def _rows(batch: dict) -> list[tuple]:
    return [tuple(row.tolist()) for row in batch["input_ids"]]


def test_batches_cover_the_set_once_with_one_share_per_rank(tmp_path):
    _, held = split_heldout(_corpus(tmp_path), 0.5, seed=0)
    whole = HeldOutBatches(held, SEQ, BATCH, seed=0)
    shares = [HeldOutBatches(held, SEQ, BATCH, dp_rank=r, dp_size=2, seed=0) for r in range(2)]
    num_rows = len(whole.plan)
    assert num_rows % BATCH, "the test needs a last batch that is not full"
    assert len(whole) == whole.total_batches == -(-num_rows // BATCH)
    labelled = 0
    for index in range(len(whole)):
        batch = whole.batch(index)
        halves = [share.batch(index) for share in shares]
        # Rank r's rows are the r-th half of the global batch: no rank evaluates all.
        for key in batch:
            assert torch.equal(batch[key], torch.cat([h[key] for h in halves])), key
        labelled += int((batch["labels"] != IGNORE_INDEX).sum())
    # Every next-token prediction of the packed held-out rows, exactly once.
    expected = sum(int(n) - 1 for n in held.doc_lengths)
    assert labelled == expected
    # The last batch is completed with rows that predict nothing.
    last = whole.batch(len(whole) - 1)
    missing = len(whole) * BATCH - num_rows
    assert (last["labels"][-missing:] == IGNORE_INDEX).all()
    assert [_rows(b) for b in whole] == [_rows(b) for b in whole], "one fixed pass"


def test_rows_are_packed_documents(tmp_path):
    _, held = split_heldout(_corpus(tmp_path), 0.5, seed=0)
    batch = HeldOutBatches(held, SEQ, BATCH, seed=0).batch(0)
    positions, ids = batch["position_ids"], batch["input_ids"]
    # A new document starts where the positions restart; its ids are all its own.
    for row_ids, row_pos in zip(ids.tolist(), positions.tolist(), strict=True):
        for left, right, pos in zip(row_ids, row_ids[1:], row_pos[1:], strict=False):
            if pos != 0 and left != 0 and right != 0:
                assert left == right
    assert (positions[:, 1:] < positions[:, :-1]).any(), "some row holds several documents"


def test_max_batches_and_too_small_a_set(tmp_path):
    _, held = split_heldout(_corpus(tmp_path), 0.5, seed=0)
    capped = HeldOutBatches(held, SEQ, BATCH, seed=0, max_batches=2)
    whole = HeldOutBatches(held, SEQ, BATCH, seed=0)
    assert len(capped) == 2 and [_rows(b) for b in capped] == [_rows(b) for b in whole][:2]
    assert len(HeldOutBatches(held, SEQ, BATCH, seed=0, max_batches=10**6)) == len(whole)
    _, tiny = split_heldout(_corpus(tmp_path), 0.02, seed=0)
    with pytest.raises(ValueError, match=r"eval\.fraction=0\.02\) is smaller than one batch"):
        HeldOutBatches(tiny, SEQ, 64, seed=0, source="the held-out set (eval.fraction=0.02)")
