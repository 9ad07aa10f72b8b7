"""Text files tokenized once into cached token files, and the built-in standard-library corpus.

``.txt``: one document per file; ``.jsonl``: one per line, field ``text_key``;
``.parquet``: one per row, column ``text_key``. The cache is a ``.bin`` token file keyed by
the files, their sizes and times and the tokenizer. The Python standard library's own
sources and pydoc topics (:func:`stdlib_text_documents`) are present on every machine
with Python.
"""

import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from d9d.dataset.token_files import write_token_file
from d9d.dataset.tokenizers import Tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def _decode(data: bytes, file: Path, start: int, line: int | None = None) -> str:
    # Invalid UTF-8 is refused where it is, rather than silently replaced.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f" (line {line})" if line is not None else ""
        raise ValueError(
            f"{file}: invalid UTF-8 at byte offset {start + err.start}{where}; convert the "
            "file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _documents_of(file: Path, text_key: str) -> Iterator[str]:
    if file.suffix == ".txt":
        yield _decode(file.read_bytes(), file, 0)
    elif file.suffix == ".jsonl":
        offset = 0
        with file.open("rb") as f:
            for number, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                line = _decode(raw, file, start, number)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{file}:{number}: not valid JSON ({err})") from None
                if not isinstance(record, dict) or text_key not in record:
                    raise ValueError(f"{file}:{number}: no field {text_key!r}")
                text = record[text_key]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{file}:{number}: field {text_key!r} holds a "
                        f"{type(text).__name__} ({str(text)[:40]}), not a string"
                    )
                yield text
    elif file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("Parquet files need 'pyarrow': pip install pyarrow") from err
        table = pq.read_table(file, columns=[text_key])
        for number, text in enumerate(table.column(text_key).to_pylist()):
            if not isinstance(text, str):
                raise ValueError(
                    f"{file}: row {number} of column {text_key!r} holds a "
                    f"{type(text).__name__}, not a string"
                )
            yield text
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
    _remove_stale_partials(cache_dir, path.stem)
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
    try:
        write_token_file(
            unique, encoded(), tokenizer.eos_id, tokenizer.vocab_size, tokenizer_name=tokenizer.name
        )
    except BaseException:
        # write_token_file removed its .tmp; its sidecar may be there already.
        Path(f"{unique}.json").unlink(missing_ok=True)
        raise
    os.replace(f"{unique}.json", f"{path}.json")
    os.replace(unique, path)
    progress(f"tokenized {count} documents, {tokens:,} tokens into {path}")
    return path


def _remove_stale_partials(cache_dir: Path, stem: str) -> None:
    # A tokenization killed mid-write (SIGKILL) leaves <stem>.<pid>.bin.tmp behind; remove
    # those of processes that no longer exist.
    for partial in cache_dir.glob(f"{stem}.*.bin*"):
        pid = partial.name[len(stem) + 1 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass


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
