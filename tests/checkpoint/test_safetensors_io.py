"""The model-agnostic safetensors folder plumbing: sizes, shard plans, index, reads, writes.

The Qwen3 mapping on top of it, and FSDP2 ``DTensor`` shards, are tested end to end in
``tests/module/model/test_hf_io.py`` and ``test_hf_fsdp.py``.
"""

import gc
import json
import weakref

import pytest
import safetensors.torch
import torch

from d9d.checkpoint.safetensors_io import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorRead,
    checkpoint_index,
    copy_full_into,
    gather_full,
    parse_shard_size,
    plan_shards,
    read_shapes,
    read_tensors,
    save_safetensors_folder,
    shard_file_names,
    write_safetensors_streaming,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1234, 1234),
        ("1234", 1234),
        ("10B", 10),
        ("40KB", 40_000),
        ("40kb", 40_000),
        (" 500 MB ", 500_000_000),
        ("5GB", 5_000_000_000),
        ("2KiB", 2048),
        ("1.5MiB", 1_572_864),
        ("1GiB", 2**30),
    ],
)
def test_parse_shard_size(size, expected):
    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", ["", "5XB", "GB", "-1MB", "5 GB extra", "1e3"])
def test_parse_shard_size_refuses_other_strings(size):
    with pytest.raises(ValueError, match=r"max_shard_size .* is not a size like 5GB"):
        parse_shard_size(size)


def test_plan_shards_fills_in_order_and_gives_a_large_tensor_its_own_shard():
    sizes = {"a": 4, "b": 6, "c": 1, "big": 25, "d": 3, "e": 7, "f": 10}
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["big"], ["d", "e"], ["f"]]
    assert plan_shards(sizes, 10**6) == [list(sizes)]
    assert plan_shards({"big": 25}, 10) == [["big"]]
    assert plan_shards({}, 10) == [[]]


def test_shard_file_names_follow_save_pretrained():
    assert shard_file_names(1) == [SAFETENSORS_SINGLE]
    assert shard_file_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(12, 4),  # 192 bytes
        "layer.0.weight": torch.randn(4, 4),  # 64 bytes
        "layer.1.weight": torch.randn(4, 4),  # 64 bytes
        "norm.weight": torch.randn(4).bfloat16(),  # 8 bytes
    }


def _save(folder, tensors, max_shard_size):
    calls = []

    def shard_tensors(names):
        calls.append(list(names))
        return {name: tensors[name] for name in names}

    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    writer = save_safetensors_folder(str(folder), sizes, max_shard_size, shard_tensors)
    return writer, calls


def test_sharded_save_writes_an_index_and_reads_back(tmp_path):
    tensors = _tensors()
    writer, calls = _save(tmp_path, tensors, "200B")
    assert writer
    # One call per shard, each with only that shard's names.
    assert calls == [["embed.weight"], ["layer.0.weight", "layer.1.weight", "norm.weight"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        SAFETENSORS_INDEX,
    ]
    index_json = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index_json["metadata"]["total_size"] == 192 + 64 + 64 + 8
    assert index_json["weight_map"]["norm.weight"] == "model-00002-of-00002.safetensors"

    index = checkpoint_index(str(tmp_path))
    assert index == {name: str(tmp_path / index_json["weight_map"][name]) for name in tensors}
    assert read_shapes(index, ["norm.weight", "embed.weight", "norm.weight"]) == {
        "norm.weight": (4,),
        "embed.weight": (12, 4),
    }
    reads = {
        "whole": TensorRead("layer.1.weight"),
        "rows": TensorRead("embed.weight", (3, 7)),
        "more rows": TensorRead("embed.weight", (7, 12)),
        "norm": TensorRead("norm.weight"),
    }
    got = dict(read_tensors(index, reads))
    assert list(got) == ["whole", "norm", "rows", "more rows"]  # grouped by file
    torch.testing.assert_close(got["whole"], tensors["layer.1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got["rows"], tensors["embed.weight"][3:7], rtol=0, atol=0)
    torch.testing.assert_close(got["more rows"], tensors["embed.weight"][7:], rtol=0, atol=0)
    assert got["norm"].dtype == torch.bfloat16


def test_single_file_save_and_index(tmp_path):
    tensors = _tensors()
    _, calls = _save(tmp_path, tensors, "5GB")
    assert calls == [list(tensors)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAFETENSORS_SINGLE]
    loaded = safetensors.torch.load_file(tmp_path / SAFETENSORS_SINGLE)
    assert loaded.keys() == tensors.keys()
    assert checkpoint_index(str(tmp_path)) == dict.fromkeys(
        tensors, str(tmp_path / SAFETENSORS_SINGLE)
    )


def test_save_refuses_a_folder_that_holds_a_checkpoint(tmp_path):
    _save(tmp_path, _tensors(), "5GB")
    before = (tmp_path / SAFETENSORS_SINGLE).read_bytes()
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(\['model.safetensors'\]"):
        _save(tmp_path, {"x": torch.zeros(2)}, "5GB")
    assert (tmp_path / SAFETENSORS_SINGLE).read_bytes() == before


def test_checkpoint_index_names_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        checkpoint_index(str(tmp_path))
    message = str(err.value)
    assert SAFETENSORS_INDEX in message and SAFETENSORS_SINGLE in message
    assert "['config.json']" in message


def test_read_tensors_keeps_no_reference_to_a_yielded_tensor(tmp_path):
    _save(tmp_path, _tensors(), "5GB")
    index = checkpoint_index(str(tmp_path))
    reads = {name: TensorRead(name) for name in ("layer.0.weight", "layer.1.weight")}
    it = read_tensors(index, reads)
    _, value = next(it)
    ref = weakref.ref(value)
    del value
    gc.collect()
    # Only the caller held it: one checkpoint tensor at a time is possible.
    assert ref() is None
    assert next(it)[0] == "layer.1.weight"


def test_copy_full_into_casts_to_the_target_dtype_in_place():
    target = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    storage = target.data_ptr()
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.25
    copy_full_into(target, value)
    assert target.dtype == torch.bfloat16 and target.data_ptr() == storage
    torch.testing.assert_close(target, value.bfloat16(), rtol=0, atol=0)
    assert gather_full(value) is value  # plain tensors pass through


def test_streaming_writer_matches_safetensors_and_checks_specs(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    specs = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    path = tmp_path / "model.safetensors"
    write_safetensors_streaming(str(path), specs, iter(tensors.items()), {"format": "pt"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value), key
    assert not (tmp_path / "model.safetensors.tmp").exists()
    wrong = dict(tensors, **{"b.weight": torch.randn(5, 3)})
    with pytest.raises(ValueError, match=r"got b\.weight \(5, 3\).*expected b\.weight \(3, 5\)"):
        write_safetensors_streaming(str(tmp_path / "bad.safetensors"), specs, iter(wrong.items()))
    with pytest.raises(ValueError, match="never produced"):
        write_safetensors_streaming(
            str(tmp_path / "short.safetensors"), specs, iter(list(tensors.items())[:2])
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
