"""Checkpoint integrity: a manifest of every file's size and CRC-32, written last.

A checkpoint folder is complete only when its ``manifest.json`` exists: the manifest is
the last file written (to a temporary name, flushed with ``fsync``, then renamed), after
every other file of the checkpoint has been written and synced. It records, per file
(relative path), the size in bytes and the CRC-32 of the contents, and what the run was
(step, layout, a hash of the config, the branch; see ``d9d.checkpoint.lineage``).

Verifying a checkpoint re-reads every file it lists and compares both numbers, so a
truncated file, a flipped byte in a tensor payload or a file replaced by another is found
before anything is loaded. CRC-32 (``zlib.crc32``, about 3.8 GB/s on one core of the
machine the README names) is not a cryptographic hash: it guards against accidents
(disks, copies, crashes), not against someone forging a checkpoint.
"""

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 16 * 2**20


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (a rename inside it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems refuse fsync on folders; the rename is still atomic there.
        pass
    finally:
        os.close(fd)


def write_file_synced(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` and flushes it to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a file that someone else wrote (e.g. ``torch.save``) to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_entry(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "crc32": "8 hex digits"}`` of one file (read in 16 MiB chunks)."""
    crc = 0
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc:08x}"}


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the manifest excluded."""
    folder = Path(folder)
    names = []
    for path in folder.rglob("*"):
        if path.is_file():
            name = path.relative_to(folder).as_posix()
            if not name.startswith(MANIFEST_FILE):
                names.append(name)
    return sorted(names)


def describe_files(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict]:
    """The manifest entries of ``names`` (relative to ``folder``)."""
    return {name: file_entry(Path(folder) / name) for name in names}


def write_manifest(folder: str | os.PathLike, record: dict, files: dict[str, dict]) -> Path:
    """Writes ``manifest.json`` atomically: a temporary file, ``fsync``, rename, folder sync.

    Args:
        folder: The checkpoint folder (every file in ``files`` already written and synced).
        record: What the run was (step, layout, config hash, branch, ...).
        files: Relative path -> ``{"size", "crc32"}``.

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    manifest = {"format": MANIFEST_FORMAT, **record, "files": dict(sorted(files.items()))}
    tmp = folder / f"{MANIFEST_FILE}.tmp"
    write_file_synced(tmp, json.dumps(manifest, indent=1).encode())
    final = folder / MANIFEST_FILE
    os.replace(tmp, final)
    fsync_dir(folder)
    return final


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a checkpoint folder.

    Raises:
        ValueError: If there is none (the save never finished) or it is unreadable.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing (the save never finished, or predates manifests)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} has an unknown format")
    if not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} lists no files")
    return manifest


def check_files(folder: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """Compares files on disk with their manifest entries.

    Args:
        folder: The checkpoint folder.
        files: Relative path -> ``{"size", "crc32"}`` (part of a manifest's ``files``).

    Returns:
        One problem per file that differs (path, what is on disk, what was recorded),
        empty if every file matches.
    """
    problems = []
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{path} has {size} bytes, the manifest records {expected['size']}")
            continue
        actual = file_entry(path)["crc32"]
        if actual != expected["crc32"]:
            problems.append(
                f"{path} has CRC-32 {actual}, the manifest records {expected['crc32']} "
                "(its contents changed after the save)"
            )
    return problems
