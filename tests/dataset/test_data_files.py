"""Data: tokenizers, token files, text caching, packed batches sharded by rank, the cursor."""

import json

import numpy as np
import pytest
import torch

from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.packed_batches import PackedBatches
from d9d.dataset.text_files import tokenize_text_files
from d9d.dataset.token_files import open_token_file, write_token_file
from d9d.dataset.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

EOS = 0


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, size=int(rng.integers(3, 30))) for _ in range(n)]


def _corpus(tmp_path, n=40) -> DocumentCorpus:
    path = write_token_file(tmp_path / "toks.bin", _docs(n), EOS, vocab_size=50)
    return DocumentCorpus([open_token_file(path, None)])


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "déjà vu — λ"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode([*ids, tok.eos_id]) == text
    assert tok.vocab_size == 258 and tok.eos_id == 256


def test_token_files_npy_and_bin(tmp_path):
    flat = np.array([5, 6, 7, 0, 8, 9, 0, 0, 3], dtype=np.uint32)
    np.save(tmp_path / "a.npy", flat)
    flat.astype(np.uint16).tofile(tmp_path / "b.bin")
    a = open_token_file(tmp_path / "a.npy", eos_id=0)
    b = open_token_file(tmp_path / "b.bin", eos_id=0, dtype="uint16")
    # Each document keeps its eos; the lone eos (nothing to predict) and the 1-id tail
    # are dropped.
    for f in (a, b):
        assert f.lengths.tolist() == [4, 3]
        assert f.starts.tolist() == [0, 4]
    corpus = DocumentCorpus([a, b])
    assert corpus.get_tokens(3, 1, 2).tolist() == [9, 0]
    with pytest.raises(ValueError, match="does not exist"):
        open_token_file(tmp_path / "missing.bin", eos_id=0)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        open_token_file(tmp_path / "b.bin", eos_id=0)


def test_batches_are_deterministic_sharded_and_resumable(tmp_path):
    corpus = _corpus(tmp_path)
    full = PackedBatches(corpus, seq_len=16, global_batch_size=4, seed=3)
    assert full.batches_per_epoch >= 2
    steps = full.batches_per_epoch + 2  # cross an epoch boundary
    reference = [full.next_batch() for _ in range(steps)]
    assert full.epoch == 1
    # Same seed, same batches; another seed, another order.
    again = PackedBatches(corpus, 16, 4, seed=3)
    assert torch.equal(again.next_batch()["input_ids"], reference[0]["input_ids"])
    other = PackedBatches(corpus, 16, 4, seed=4)
    assert not torch.equal(other.next_batch()["input_ids"], reference[0]["input_ids"])
    # Two data-parallel ranks read the two halves of each global batch.
    ranks = [PackedBatches(corpus, 16, 4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for ref in reference:
        halves = [r.next_batch() for r in ranks]
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(torch.cat([h[key] for h in halves]), ref[key])
    # The cursor saved on one layout resumes on another.
    cursor = PackedBatches(corpus, 16, 4, dp_rank=1, dp_size=2, seed=3)
    for _ in range(3):
        cursor.next_batch()
    resumed = PackedBatches(corpus, 16, 4, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(cursor.state_dict())))
    for ref in reference[3:]:
        assert torch.equal(resumed.next_batch()["input_ids"], ref["input_ids"])


def test_bad_data(tmp_path):
    corpus = _corpus(tmp_path, n=3)
    with pytest.raises(ValueError, match="smaller than one batch"):
        PackedBatches(corpus, seq_len=16, global_batch_size=64)
    with pytest.raises(ValueError, match="does not split over 3"):
        PackedBatches(corpus, 4, 4, dp_size=3)
    batches = PackedBatches(corpus, 4, 2, seed=0)
    with pytest.raises(ValueError, match="seq_len: saved 8, now 4"):
        batches.load_state_dict({**batches.state_dict(), "seq_len": 8})


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3, "again": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_text_files_tokenized_once_and_cached(tmp_path):
    tok = HFTokenizer(_word_tokenizer(tmp_path / "tok"))
    assert tok.vocab_size == 5 and tok.eos_id == 0
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "world again hello"}\n\n{"text": "zzz"}\n')
    lines = []
    path = tokenize_text_files([tmp_path], tok, tmp_path / "cache", progress=lines.append)
    tokens = np.fromfile(path, dtype=np.uint16).tolist()
    assert tokens == [2, 3, 0, 3, 4, 2, 0, 1, 0]
    assert lines and "3 documents" in lines[-1]
    # A second call hits the cache (no progress line).
    again = []
    assert tokenize_text_files([tmp_path], tok, tmp_path / "cache", progress=again.append) == path
    assert again == []
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_text_files([tmp_path / "nope.txt"], tok, tmp_path / "cache")
    with pytest.raises(ValueError, match="no field 'body'"):
        tokenize_text_files([tmp_path / "b.jsonl"], tok, tmp_path / "c2", text_key="body")


def test_stdlib_corpus_is_found():
    from d9d.dataset.text_files import stdlib_text_files

    files = stdlib_text_files()
    names = {f.name for f in files}
    assert {"os.py", "typing.py"} <= names
    assert not any("site-packages" in f.parts for f in files)


def test_long_documents_are_cut_to_the_models_positions():
    import numpy as np

    from d9d.dataset.corpus import DocumentCorpus
    from d9d.dataset.token_files import TokenFile

    tokens = np.arange(20, dtype=np.uint16)
    corpus = DocumentCorpus([TokenFile("mem", tokens, np.array([0, 5]), np.array([5, 15]))])
    split = corpus.split_long_documents(4)
    # 5 -> 4 (+ a 1-token rest, too short to train on); 15 -> 4 + 4 + 4 + 3.
    assert split.doc_lengths.tolist() == [4, 4, 4, 4, 3]
    pieces = [split.get_tokens(i, 0, int(n)).tolist() for i, n in enumerate(split.doc_lengths)]
    assert pieces[1:] == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19]]
    assert corpus.doc_lengths.tolist() == [5, 15]  # the original is untouched
