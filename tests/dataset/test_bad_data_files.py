"""Broken data files are refused naming the file and where in it; nothing partial is left."""

import os

import numpy as np
import pytest

from d9d.dataset.text_files import tokenize_text_files
from d9d.dataset.token_files import open_token_file, token_files_in, write_token_file
from d9d.dataset.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _tokenize(tmp_path, *files):
    return tokenize_text_files(list(files), TOK, tmp_path / "cache", progress=lambda _m: None)


def _no_partials(cache):
    return sorted(p.name for p in cache.iterdir() if ".tmp" in p.name or ".bin" in p.name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"text": "ok"}\n{"text": 5}\n',
            r"b\.jsonl:2: field 'text' holds a int \(5\), not a string",
        ),
        (b'{"text": "ok"}\n{"text": "x",\n', r"b\.jsonl:2: not valid JSON \(Expecting"),
        (b'{"text": "ok"}\n["x"]\n', r"b\.jsonl:2: no field 'text'"),
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"b\.jsonl: invalid UTF-8 at byte offset 28 \(line 2\)",
        ),
    ],
)
def test_broken_jsonl_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _tokenize(tmp_path, path)
    # The failed tokenization left nothing behind in the cache.
    assert _no_partials(tmp_path / "cache") == []


def test_invalid_utf8_text_file_is_refused_with_the_byte_offset(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("naïve".encode() + b" \xff tail")
    with pytest.raises(ValueError, match=r"a\.txt: invalid UTF-8 at byte offset 7; convert"):
        _tokenize(tmp_path, path)


def test_stale_partial_files_of_dead_processes_are_removed(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    first = _tokenize(tmp_path, tmp_path / "a.txt")
    first.unlink()
    # A tokenization SIGKILLed mid-write by a process that no longer exists.
    dead = 2**22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    stale = first.with_name(f"{first.stem}.{dead}.bin.tmp")
    stale.write_bytes(b"partial")
    assert _tokenize(tmp_path, tmp_path / "a.txt") == first
    assert not stale.exists()


def test_odd_length_bin_names_the_file(tmp_path):
    path = write_token_file(tmp_path / "t.bin", [[1, 2, 3]], 0, 50)
    with path.open("ab") as f:
        f.write(b"\x01")
    with pytest.raises(ValueError, match=r"t\.bin: 9 bytes is not a whole number of uint16 tokens"):
        open_token_file(path, None)


def test_failed_write_leaves_no_tmp(tmp_path):
    def documents():
        yield [1, 2]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        write_token_file(tmp_path / "t.bin", documents(), 0, 50)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_token_files_is_searched(tmp_path):
    (tmp_path / "shards" / "deep").mkdir(parents=True)
    a = write_token_file(tmp_path / "shards" / "b.bin", [[1, 2]], 0, 50)
    b = tmp_path / "shards" / "deep" / "a.npy"
    np.save(b, np.array([3, 4, 0], dtype=np.uint16))
    assert token_files_in([tmp_path / "shards"]) == [a, b]
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"token folder .*empty holds no \('\.npy', '\.bin'\) files"
    ):
        token_files_in([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"token file .*nope\.bin does not exist"):
        token_files_in([tmp_path / "nope.bin"])
