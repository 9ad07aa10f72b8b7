"""Token files: ``.npy`` or raw ``.bin`` arrays of uint16/uint32 ids, memory-mapped.

Documents are separated by an end-of-document id; nothing is read until a row needs it.
A raw ``.bin`` file written by :func:`write_token_file` has a ``<path>.json`` sidecar
recording its dtype, end-of-document id and vocabulary.
"""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN_SUFFIXES = (".npy", ".bin")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def write_token_file(
    path: str | Path,
    documents: Iterable[np.ndarray | list[int]],
    eos_id: int,
    vocab_size: int,
    *,
    tokenizer_name: str = "",
) -> Path:
    """Writes documents as one raw ``.bin`` token file, each followed by ``eos_id``.

    A ``<path>.json`` sidecar records the dtype, the eos id, the vocabulary size and the
    counts. The file is written under a temporary name and renamed when complete.

    Args:
        path: The ``.bin`` file to write.
        documents: Token ids per document (no eos).
        eos_id: The end-of-document id.
        vocab_size: The tokenizer's vocabulary size (decides uint16 or uint32).
        tokenizer_name: Recorded in the sidecar.

    Returns:
        The path written.
    """
    path = Path(path)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    tmp = path.with_name(path.name + ".tmp")
    num_tokens = num_documents = 0
    eos = np.array([eos_id], dtype=dtype)
    try:
        with tmp.open("wb") as f:
            for doc in documents:
                array = np.asarray(doc, dtype=dtype)
                f.write(array.tobytes())
                f.write(eos.tobytes())
                num_tokens += array.size + 1
                num_documents += 1
    except BaseException:
        # A failed tokenization (bad input, Ctrl-C) leaves no partial file behind.
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "dtype": np.dtype(dtype).name,
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "tokenizer": tokenizer_name,
    }
    Path(f"{path}.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    return path


@dataclass
class TokenFile:
    """One memory-mapped token file split into documents.

    Attributes:
        path: The file.
        tokens: The ids (a read-only memory map).
        starts: Start offset of each document.
        lengths: Length of each document, its trailing eos included.
    """

    path: Path
    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def token_files_in(paths: Iterable[str | Path]) -> list[Path]:
    """The token files of ``paths``: files as given, folders searched recursively.

    A folder contributes its ``.npy`` and ``.bin`` files (sorted; ``.json`` sidecars are
    not token files).

    Raises:
        ValueError: If a path does not exist or a folder holds no token files.
    """
    found = []
    for entry in map(Path, paths):
        if entry.is_dir():
            inside = sorted(
                p for p in entry.rglob("*") if p.suffix in TOKEN_SUFFIXES and p.is_file()
            )
            if not inside:
                raise ValueError(f"token folder {entry} holds no {TOKEN_SUFFIXES} files")
            found += inside
        elif entry.exists():
            found.append(entry)
        else:
            raise ValueError(f"token file {entry} does not exist")
    return found


def open_token_file(path: str | Path, eos_id: int | None, dtype: str | None = None) -> TokenFile:
    """Memory-maps a ``.npy`` or ``.bin`` token file and finds its documents.

    A document is the run of ids up to and including an ``eos_id`` (or the end of the
    file); documents of fewer than two ids (nothing to predict) are dropped.

    Args:
        path: The file.
        eos_id: The end-of-document id (``None``: the ``.json`` sidecar's).
        dtype: ``"uint16"`` / ``"uint32"`` for ``.bin`` files without a sidecar.

    Raises:
        ValueError: If the file is missing, of an unsupported suffix or dtype, or the eos
            id is unknown.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist")
    sidecar = Path(f"{path}.json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        name = meta.get("dtype", dtype)
        if name not in _DTYPES:
            raise ValueError(f"{path}: token dtype must be uint16 or uint32, got {name!r}")
        itemsize = np.dtype(_DTYPES[name]).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise ValueError(
                f"{path}: {size} bytes is not a whole number of {name} tokens ({itemsize} "
                "bytes each): a truncated file, or another data.token_dtype"
            )
        if size == 0:
            raise ValueError(f"{path} is empty")
        tokens = np.memmap(path, dtype=_DTYPES[name], mode="r")
    else:
        raise ValueError(f"{path}: token files must end in {TOKEN_SUFFIXES}")
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(
            f"{path}: expected a 1-D uint16/uint32 array, got {tokens.dtype} {tokens.shape}"
        )
    eos_id = meta.get("eos_id") if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError(f"{path}: no end-of-document id (set data.eos_id)")
    ends = np.flatnonzero(tokens == eos_id) + 1
    if ends.size == 0 or ends[-1] != tokens.size:
        ends = np.append(ends, tokens.size)
    starts = np.concatenate([[0], ends[:-1]])
    lengths = ends - starts
    keep = lengths >= 2
    return TokenFile(path, tokens, starts[keep], lengths[keep])
