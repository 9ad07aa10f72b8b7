"""The streamed HF export of a training checkpoint equals the in-memory exporter's folder."""

import json
import warnings

import pytest
import safetensors.torch
import torch

from d9d.checkpoint.hf_export import export_hf_from_checkpoint
from d9d.checkpoint.safetensors_io import checkpoint_index
from d9d.checkpoint.training import CheckpointError, CheckpointManager
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.model.qwen3_dense.hf_io import save_hf_checkpoint
from tests.helpers import build, randomize_, small_causal_lm_params


@pytest.fixture
def checkpoint(tmp_path):
    # Two vocabulary splits in non-alphabetical order: the export concatenates them.
    params = small_causal_lm_params(num_hidden_layers=2)
    torch.manual_seed(0)
    model = randomize_(build(Qwen3DenseForCausalLM, params))
    optimizer = torch.optim.AdamW(model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        path = CheckpointManager(tmp_path / "ck").save(
            3, [model], [optimizer], scheduler=None, data_state={}, model_params={}
        )
    return params, model, path


def _tensors(folder):
    index = checkpoint_index(str(folder))
    out = {}
    for file in set(index.values()):
        out.update(safetensors.torch.load_file(file))
    return out


def test_streamed_export_equals_the_in_memory_one(checkpoint, tmp_path):
    params, model, path = checkpoint
    save_hf_checkpoint(model, tmp_path / "reference")
    folder = export_hf_from_checkpoint(params, path, tmp_path / "hf", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    ours, reference = _tensors(folder), _tensors(tmp_path / "reference")
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    config = json.loads((folder / "config.json").read_text())
    assert config == json.loads((tmp_path / "reference" / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"{folder} already holds a checkpoint"):
        export_hf_from_checkpoint(params, path, folder)


def test_export_verifies_the_checkpoint_first(checkpoint, tmp_path):
    params, _, path = checkpoint
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard} has CRC-32 "):
        export_hf_from_checkpoint(params, path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # verified before anything is written
