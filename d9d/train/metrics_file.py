"""``metrics.jsonl`` across restarts: one line per step of the live branch.

Every record with a ``"step"`` (training steps, and any other kind a sink writes with one)
belongs to the history that produced it. On resume from step ``N`` the records after
``N`` are dropped (their steps run again); when the run changes branch (see
``d9d.checkpoint.lineage``) the file of the branch that was live is kept as
``metrics.<branch>.jsonl`` and ``metrics.jsonl`` restarts from the new branch's history;
a fresh start moves an old file aside as ``metrics.replaced-<time>.jsonl``. Nothing is
deleted.

A run killed while appending leaves a half-written last line: it is dropped (and said
so). A broken line elsewhere is an error naming the file and the line.
"""

import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def read_records(path: Path, log: Callable[[str], None]) -> list[tuple[str, dict]]:
    """The ``(line, record)`` pairs of a JSON-lines metrics file.

    Raises:
        ValueError: For a line that is not a JSON object, unless it is the last one
            (a write cut short: dropped, and logged).
    """
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if index == len(numbered) - 1:
                log(f"dropped the half-written last line {number} of {path} ({err})")
                break
            raise ValueError(
                f"{path} line {number} is not a JSON record ({err}); fix or remove that line"
            ) from err
        records.append((line, record))
    return records


def _until(records: list[tuple[str, dict]], step: int) -> list[str]:
    kept = []
    for line, record in records:
        value = record.get("step")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > step:
            continue
        kept.append(line)
    return kept


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def keep_until(path: Path, step: int, log: Callable[[str], None]) -> None:
    """Drops the records after ``step`` (they run again after a resume)."""
    if path.is_file():
        _write(path, _until(read_records(path, log), step))


def switch_branch(
    path: Path,
    previous: str,
    source: Path | None,
    step: int,
    log: Callable[[str], None],
) -> None:
    """Keeps the previous branch's file, then restarts ``path`` from another history.

    Args:
        path: ``metrics.jsonl``.
        previous: The branch that was live (its file becomes ``metrics.<previous>.jsonl``).
        source: The file holding the new branch's history up to ``step`` (``path``
            itself when it forks from the previous branch's history), or ``None``.
        step: The step the new branch continues from.
        log: Receives what was done.
    """
    archived = path.with_name(f"{path.stem}.{previous}{path.suffix}")
    records = read_records(path, log) if path.is_file() else []
    if source == path:
        source_records = records
    elif source is not None and source.is_file():
        source_records = read_records(source, log)
    else:
        source_records = []
    if path.is_file():
        _write(archived, [line for line, _ in records])
        log(f"kept the metrics of branch {previous} in {archived}")
    _write(path, _until(source_records, step))


def move_aside(path: Path, log: Callable[[str], None]) -> None:
    """Renames an old ``metrics.jsonl`` before a fresh start (never appended to)."""
    if not path.is_file():
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.stem}.replaced-{stamp}-{suffix}{path.suffix}")
    os.replace(path, target)
    log(f"fresh start: moved the old {path.name} to {target}")
