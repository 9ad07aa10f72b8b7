"""Checkpoint manifests: sizes and CRC-32 of every file, written atomically, compared."""

import json
import zlib

import pytest

from d9d.checkpoint.manifest import (
    MANIFEST_FILE,
    check_files,
    describe_files,
    file_entry,
    list_files,
    read_manifest,
    write_manifest,
)


def test_entries_are_size_and_crc32(tmp_path):
    data = bytes(range(256)) * 70_000  # larger than one read chunk
    (tmp_path / "a.bin").write_bytes(data)
    assert file_entry(tmp_path / "a.bin") == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def test_round_trip_and_every_kind_of_damage(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.pt").write_bytes(b"y" * 10)
    names = list_files(tmp_path)
    assert names == ["a.bin", "sub/b.pt"]
    write_manifest(tmp_path, {"step": 3}, describe_files(tmp_path, names))
    assert list_files(tmp_path) == names  # the manifest does not list itself
    assert not (tmp_path / f"{MANIFEST_FILE}.tmp").exists()
    manifest = read_manifest(tmp_path)
    assert manifest["step"] == 3 and check_files(tmp_path, manifest["files"]) == []

    (tmp_path / "a.bin").write_bytes(b"x" * 999 + b"z")  # same size, one byte changed
    (tmp_path / "sub" / "b.pt").write_bytes(b"y" * 4)  # truncated
    problems = check_files(tmp_path, manifest["files"])
    assert problems[0].startswith(f"{tmp_path / 'a.bin'} has CRC-32 ")
    assert "the manifest records" in problems[0]
    assert problems[1] == f"{tmp_path / 'sub' / 'b.pt'} has 4 bytes, the manifest records 10"
    (tmp_path / "a.bin").unlink()
    assert check_files(tmp_path, manifest["files"])[0] == f"{tmp_path / 'a.bin'} is missing"


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.json is missing \(the save never finished"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": 1, "files"')
    with pytest.raises(ValueError, match="is unreadable"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": 99, "files": {}}))
    with pytest.raises(ValueError, match="unknown format"):
        read_manifest(tmp_path)
