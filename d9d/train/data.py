"""Training data: token files -> documents -> packed rows -> per-rank batches, resumable.

Sources:

* token files: ``.npy`` or raw ``.bin`` arrays of uint16/uint32 ids, documents separated
  by an end-of-document id, memory-mapped (nothing is read until a row needs it);
* text files (``.txt``: one document per file; ``.jsonl``: one per line, field
  ``text_key``; ``.parquet``: one per row, column ``text_key``), tokenized once and
  cached as a ``.bin`` token file keyed by the files, their sizes and times and the
  tokenizer;
* the Python standard library's own sources and pydoc topics (``stdlib_text_documents``),
  present on every machine with Python.

Packing: every document keeps its end-of-document id, and the documents are packed into
rows of ``seq_len + 1`` tokens by ``d9d.dataset.packing`` (positions restart with each
document, so packed documents do not attend to each other). The plan is made once from
the seed; each epoch visits its rows in a new order, a permutation drawn from
``(seed, epoch)``. A *global* batch is ``global_batch_size`` consecutive rows of that
order, and data-parallel rank ``r`` of ``n`` takes the ``r``-th of its ``n`` equal slices,
so the cursor (epoch, batch) means the same under every layout.
"""

import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d9d.dataset.packing import materialize_rows, plan_packed_rows
from d9d.train.tokenizers import Tokenizer

TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Token files


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
    with tmp.open("wb") as f:
        for doc in documents:
            array = np.asarray(doc, dtype=dtype)
            f.write(array.tobytes())
            f.write(eos.tobytes())
            num_tokens += array.size + 1
            num_documents += 1
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


class DocumentCorpus:
    """The documents of several token files, indexed globally.

    Attributes:
        files: The token files.
        doc_lengths: Length of every document (eos included), file by file.
    """

    def __init__(self, files: list[TokenFile], max_documents: int | None = None):
        """Indexes the documents of ``files`` (in order), at most ``max_documents``."""
        if not files:
            raise ValueError("no token files given")
        self.files = files
        file_of = np.concatenate([np.full(f.lengths.size, i) for i, f in enumerate(files)])
        start = np.concatenate([f.starts for f in files])
        lengths = np.concatenate([f.lengths for f in files])
        if max_documents is not None:
            file_of, start, lengths = (a[:max_documents] for a in (file_of, start, lengths))
        self._file_of, self._start = file_of, start
        self.doc_lengths = lengths

    def __len__(self) -> int:
        return int(self.doc_lengths.size)

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents."""
        return int(self.doc_lengths.sum())

    def max_token_id(self) -> int:
        """The largest id in the files (reads them once)."""
        return max(int(f.tokens.max()) if f.tokens.size else 0 for f in self.files)

    def get_tokens(self, doc_index: int, start: int, length: int) -> torch.Tensor:
        """``length`` ids of document ``doc_index`` from ``start``, as int64."""
        file = self.files[int(self._file_of[doc_index])]
        offset = int(self._start[doc_index]) + start
        return torch.from_numpy(file.tokens[offset : offset + length].astype(np.int64))


# ---------------------------------------------------------------------------------------
# Text -> cached token files


def _text_files(paths: Iterable[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found += sorted(p for p in entry.rglob("*") if p.suffix in suffixes and p.is_file())
        elif entry.is_file():
            if entry.suffix not in suffixes:
                raise ValueError(f"{entry}: expected a file ending in {suffixes}")
            found.append(entry)
        else:
            raise ValueError(f"data file {entry} does not exist")
    if not found:
        raise ValueError(f"no {suffixes} files found in {list(map(str, paths))}")
    return found


def _documents_of(file: Path, text_key: str) -> Iterator[str]:
    if file.suffix == ".txt":
        yield file.read_text(encoding="utf-8", errors="replace")
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_key not in record:
                    raise ValueError(f"{file}:{number}: no field {text_key!r}")
                yield record[text_key]
    elif file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("Parquet files need 'pyarrow': pip install pyarrow") from err
        table = pq.read_table(file, columns=[text_key])
        yield from table.column(text_key).to_pylist()
    else:
        raise ValueError(f"{file}: unsupported text file (expected {TEXT_SUFFIXES})")


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if tokenizer.name == "byte":
        # Byte ids are the bytes themselves: no per-character Python loop.
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def tokenize_to_cache(
    documents: Callable[[], Iterator[str]],
    key_parts: list[str],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    *,
    total: int | None = None,
    progress: Callable[[str], None] = _progress,
) -> Path:
    """Tokenizes documents once into a cached ``.bin`` token file.

    Args:
        documents: Yields the documents' texts (called only on a cache miss).
        key_parts: What identifies the documents (paths, sizes, times); the tokenizer's
            name is added.
        tokenizer: The tokenizer.
        cache_dir: The cache folder.
        total: Number of documents, for the progress lines.
        progress: Receives a progress line about every two seconds.

    Returns:
        The token file.
    """
    digest = hashlib.sha256("\n".join([tokenizer.name, *key_parts]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokens-{digest}.bin"
    if path.is_file() and Path(f"{path}.json").is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = last = time.monotonic()
    count = tokens = 0

    def encoded() -> Iterator[np.ndarray]:
        nonlocal count, tokens, last
        for text in documents():
            ids = _encode(tokenizer, text)
            count += 1
            tokens += ids.size
            now = time.monotonic()
            if now - last > 2.0:
                last = now
                of = f"/{total}" if total else ""
                progress(
                    f"tokenizing: {count}{of} documents, {tokens:,} tokens, {now - started:.0f} s"
                )
            yield ids

    # One writer per cache file: with several processes, each writes its own temporary
    # file and the rename publishes a complete one.
    unique = path.with_name(f"{path.stem}.{os.getpid()}.bin")
    write_token_file(
        unique, encoded(), tokenizer.eos_id, tokenizer.vocab_size, tokenizer_name=tokenizer.name
    )
    os.replace(f"{unique}.json", f"{path}.json")
    os.replace(unique, path)
    progress(f"tokenized {count} documents, {tokens:,} tokens into {path}")
    return path


def tokenize_text_files(
    paths: Iterable[str | Path],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    *,
    text_key: str = "text",
    progress: Callable[[str], None] = _progress,
) -> Path:
    """Tokenizes ``.txt``/``.jsonl``/``.parquet`` files (or folders of them) into a cache.

    Returns:
        The cached token file.

    Raises:
        ValueError: If a path is missing or holds no such files.
    """
    files = _text_files(paths, TEXT_SUFFIXES)
    key = [text_key] + [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]

    def documents() -> Iterator[str]:
        for file in files:
            yield from _documents_of(file, text_key)

    return tokenize_to_cache(documents, key, tokenizer, cache_dir, progress=progress)


def stdlib_text_files() -> list[Path]:
    """The standard library's ``.py`` files (tests and site-packages left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def stdlib_text_documents() -> Iterator[str]:
    """The pydoc topics (the language reference's prose), then the stdlib sources."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        yield topics[name]
    for file in stdlib_text_files():
        yield file.read_text(encoding="utf-8", errors="replace")


def tokenize_stdlib(
    tokenizer: Tokenizer, cache_dir: str | Path, progress: Callable[[str], None] = _progress
) -> Path:
    """Tokenizes the standard-library corpus into a cache; returns the token file."""
    files = stdlib_text_files()
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    key = ["stdlib", sys.version] + [f"{f}:{f.stat().st_size}" for f in files]
    return tokenize_to_cache(
        stdlib_text_documents,
        key,
        tokenizer,
        cache_dir,
        total=len(files) + len(topics),
        progress=progress,
    )


# ---------------------------------------------------------------------------------------
# Packed, sharded, resumable batches


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
