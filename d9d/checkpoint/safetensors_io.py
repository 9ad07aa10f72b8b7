"""Model-agnostic reading and writing of safetensors checkpoint folders.

The folder layout is the one Hugging Face ``save_pretrained`` writes: either one
``model.safetensors`` or numbered shards ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` mapping each tensor name to its shard. Nothing here knows
a model: names are the checkpoint's own, and the caller maps them to its parameters (see
``d9d.module.model.qwen3_dense.hf_io`` for Qwen3).

Reads stream one tensor at a time and can take a row range of a tensor without reading
the rest; writes hold one shard's worth of tensors at a time, or, with
:func:`write_safetensors_streaming` (whose header is planned from shapes and dtypes
alone), one tensor at a time. Parameters that are FSDP2
``DTensor`` shards are filled from full tensors read on every rank
(:func:`copy_full_into`) and gathered for export (:func:`gather_full`).

Needs the optional ``safetensors`` package (``pip install 'd9d[hf]'``).
"""

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}

K = TypeVar("K")


def require_safetensors():
    """Imports the optional ``safetensors`` package, with an install hint if it is missing.

    Returns:
        The ``safetensors`` module (with ``safetensors.torch`` imported).

    Raises:
        ImportError: If ``safetensors`` is not installed.
    """
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(
            "reading or writing Hugging Face checkpoints needs the optional 'safetensors' "
            "package: pip install 'd9d[hf]'"
        ) from err
    return safetensors


def _safe_open(path: str):
    # One indirection so that tests can observe which tensors are read.
    return require_safetensors().safe_open(path, framework="pt", device="cpu")


# --- reading ------------------------------------------------------------------------------


def checkpoint_index(folder: str) -> dict[str, str]:
    """Maps every tensor name of a safetensors folder to the file holding it.

    Args:
        folder: A folder with ``model.safetensors.index.json`` (and its shards) or a single
            ``model.safetensors``.

    Returns:
        Tensor name -> path of its file (inside ``folder``).

    Raises:
        FileNotFoundError: If the folder has neither file.
    """
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    if os.path.isfile(single_path):
        with _safe_open(single_path) as f:
            return dict.fromkeys(f.keys(), single_path)
    raise FileNotFoundError(
        f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in {folder!r} "
        f"(found: {sorted(os.listdir(folder))})"
    )


@dataclass(frozen=True)
class TensorRead:
    """One tensor to read from a checkpoint, whole or a range of its rows.

    Attributes:
        name: The tensor's name in the checkpoint.
        rows: ``[start, end)`` rows of dimension 0 to read, or ``None`` for the whole tensor.
    """

    name: str
    rows: tuple[int, int] | None = None


def _group_by_file(index: Mapping[str, str], items: Iterable[tuple[K, str]]) -> dict[str, list[K]]:
    # Each file is opened once; the order of first appearance is kept.
    by_file: dict[str, list[K]] = {}
    for item, name in items:
        by_file.setdefault(index[name], []).append(item)
    return by_file


def read_shapes(index: Mapping[str, str], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Reads the shapes of some checkpoint tensors from the file headers (no data).

    Args:
        index: As returned by :func:`checkpoint_index`.
        names: Tensor names, all present in ``index``.

    Returns:
        Tensor name -> shape.
    """
    shapes = {}
    unique = dict.fromkeys(names)
    for file, file_names in _group_by_file(index, ((n, n) for n in unique)).items():
        with _safe_open(file) as f:
            for name in file_names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def read_tensors(
    index: Mapping[str, str], reads: Mapping[K, TensorRead]
) -> Iterator[tuple[K, torch.Tensor]]:
    """Streams tensors (or row ranges of them) from a checkpoint, file by file.

    The iterator keeps no reference to a tensor once it has yielded it, so a caller that
    drops each tensor before asking for the next holds one checkpoint tensor at a time.

    Args:
        index: As returned by :func:`checkpoint_index`.
        reads: Caller's key -> what to read for it; every name must be in ``index``.
            Several keys may read (parts of) the same tensor.

    Yields:
        ``(key, tensor)`` on the CPU, in the checkpoint's dtype, grouped by file.
    """
    for file, keys in _group_by_file(index, ((k, r.name) for k, r in reads.items())).items():
        with _safe_open(file) as f:
            for key in keys:
                read = reads[key]
                if read.rows is None:
                    yield key, f.get_tensor(read.name)
                else:
                    yield key, f.get_slice(read.name)[read.rows[0] : read.rows[1]]


@torch.no_grad()
def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copies a full tensor into a parameter or buffer, cast to its dtype and device.

    Args:
        target: A plain tensor, or a ``DTensor`` (e.g. an FSDP2 shard): then only this
            rank's shard of ``value`` is copied. Every rank must hold the same full
            ``value``, since no data is exchanged.
        value: The full (global) tensor, of ``target``'s global shape.
    """
    value = value.to(dtype=target.dtype)
    if isinstance(target, DTensor):
        # Every rank read the same full tensor, so each can cut its own shard locally:
        # src_data_rank=None skips the broadcast.
        value = distribute_tensor(
            value.to(target.to_local().device),
            target.device_mesh,
            target.placements,
            src_data_rank=None,
        )
    else:
        value = value.to(target.device)
    target.copy_(value)


# --- writing ------------------------------------------------------------------------------


def gather_full(value: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ``DTensor``, or ``value`` itself if it is a plain tensor.

    For a ``DTensor`` this is a collective: every rank must call it in the same order.
    """
    return value.full_tensor() if isinstance(value, DTensor) else value


def parse_shard_size(size: int | str) -> int:
    """Parses a shard size: bytes, or a string like ``"5GB"``, ``"500MB"``, ``"1.5GiB"``.

    Units are case-insensitive; ``KB``/``MB``/``GB`` are decimal, ``KiB``/``MiB``/``GiB``
    binary, and a bare number or ``B`` means bytes.

    Raises:
        ValueError: If the string is not such a size.
    """
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Splits tensors, in order, into consecutive shards of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` gets a shard of its own.

    Args:
        sizes: Tensor name -> size in bytes, in the order to write.
        max_bytes: The largest shard size.

    Returns:
        The tensor names of each shard (one empty shard if ``sizes`` is empty).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """File names for ``num_shards`` shards, as ``save_pretrained`` names them."""
    if num_shards == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _refuse_occupied_folder(folder: str, writer: bool, distributed: bool) -> None:
    problem = [None]
    if writer:
        os.makedirs(folder, exist_ok=True)
        stale = [
            n for n in os.listdir(folder) if n.endswith(".safetensors") or n == SAFETENSORS_INDEX
        ]
        if stale:
            problem[0] = f"{folder!r} already holds a checkpoint ({sorted(stale)})"
    if distributed:
        # Every rank must stop together, or the others would wait in full_tensor() forever.
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(problem[0])


def save_safetensors_folder(
    folder: str,
    sizes: Mapping[str, int],
    max_shard_size: int | str,
    shard_tensors: Callable[[list[str]], dict[str, torch.Tensor]],
) -> bool:
    """Writes tensors as ``model.safetensors`` or as shards plus an index, shard by shard.

    Under ``torch.distributed`` every rank calls this together and ``shard_tensors`` runs
    on every rank (it may gather ``DTensor`` shards, a collective); only rank 0 writes.

    Args:
        folder: Output folder (created if needed). It must not already hold a safetensors
            checkpoint, so that stale shards cannot mix with new ones.
        sizes: Tensor name -> size in bytes of every tensor to write, in order.
        max_shard_size: As accepted by :func:`parse_shard_size`.
        shard_tensors: Builds the CPU tensors of one shard from their names; called once
            per shard, so only one shard's worth of tensors is held at a time.

    Returns:
        Whether this rank wrote the files (the one that should write any other file).

    Raises:
        ImportError: If ``safetensors`` is not installed.
        ValueError: If ``max_shard_size`` is not a size or the folder already holds a
            checkpoint (raised on every rank).
    """
    st = require_safetensors()
    shards = plan_shards(sizes, parse_shard_size(max_shard_size))
    names = shard_file_names(len(shards))
    distributed = dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    _refuse_occupied_folder(folder, writer, distributed)
    for name, keys in zip(names, shards, strict=True):
        tensors = shard_tensors(keys)
        if writer:
            st.torch.save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        del tensors
    if writer and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {
                key: name for name, keys in zip(names, shards, strict=True) for key in keys
            },
        }
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return writer


# The safetensors format: an 8-byte little-endian header length, a JSON header mapping
# each name to its dtype, shape and [begin, end) byte range in the data that follows
# (padded with spaces to a multiple of 8), then the tensors' raw little-endian bytes.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors_streaming(
    path: str,
    specs: Mapping[str, tuple[Sequence[int], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a ``.safetensors`` file one tensor at a time.

    The header is built from ``specs`` before any data is written, so the caller can
    produce each tensor just before it is needed and drop it right after: peak memory
    is one tensor, not the file. The file is written under a temporary name and renamed
    when complete.

    Args:
        path: The file to write.
        specs: Name -> (shape, dtype) of every tensor, in the order ``tensors`` yields them.
        tensors: ``(name, tensor)`` pairs on the CPU, each matching its spec.
        metadata: String metadata for the header (``{"format": "pt"}``).

    Raises:
        ValueError: If a tensor does not match its spec, or is missing or extra.
    """
    header: dict = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    expected = iter(specs.items())
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, tensor in tensors:
                want_name, (shape, dtype) = next(expected, (None, (None, None)))
                matches = tuple(tensor.shape) == tuple(shape or ()) and tensor.dtype == dtype
                if name != want_name or not matches:
                    raise ValueError(
                        f"{path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected "
                        f"{want_name} {None if shape is None else tuple(shape)} {dtype}"
                    )
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del data, tensor
            missing = [name for name, _ in expected]
            if missing:
                raise ValueError(f"{path}: tensors never produced: {missing[:5]}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
