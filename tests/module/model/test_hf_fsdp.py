"""HF checkpoints into and out of an FSDP2-wrapped model (2 CPU processes, gloo)."""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

from d9d.module.model.qwen3_dense.hf_config import causal_lm_params_from_hf_config
from d9d.module.model.qwen3_dense.hf_io import load_hf_checkpoint, save_hf_checkpoint
from d9d.module.model.qwen3_dense.model import whole_model
from tests.helpers import (
    assert_close_scaled,
    hf_folder_config,
    hf_nll,
    hf_tokens,
    run_spawned,
    save_random_hf,
)

WORLD = 2
# 51 rows do not split evenly over 2 ranks: FSDP2 pads the last shard.
SPLITS = {"split_vocab_size": {"a": 45, "b": 51}, "split_vocab_order": ["b", "a"]}


def _build(folder, wrap: bool):
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    with torch.device("meta"):
        model = whole_model(params)
    if wrap:
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model.to_empty(device="cpu")


def fsdp_load_and_export(workdir, folder, export_dir, result_file) -> dict:
    """Runs on every rank: load into FSDP2 shards, check them, compute the NLL, export."""
    rank = dist.get_rank()
    ids = hf_tokens()
    model = _build(folder, wrap=True)
    load_hf_checkpoint(model, folder)
    reference = _build(folder, wrap=False)
    load_hf_checkpoint(reference, folder)
    reference = reference.state_dict()
    own_rows = {}
    for key, value in model.state_dict().items():
        assert isinstance(value, DTensor) and value.placements == (Shard(0),), key
        # Each rank holds exactly its own chunk of the full tensor.
        expected = reference[key].chunk(WORLD)[rank]
        torch.testing.assert_close(value.to_local(), expected, rtol=0, atol=0, msg=key)
        own_rows[key] = value.to_local().shape[0]
    full = {key: value.full_tensor() for key, value in model.state_dict().items()}
    with torch.no_grad():
        nll = model(input_ids=ids[:, :-1], labels=ids[:, 1:])["logps"]
    save_hf_checkpoint(model, export_dir, max_shard_size="40KB")
    if rank == 0:
        torch.save({"full": full, "nll": nll, "own_rows": own_rows}, result_file)
    return {}


def test_fsdp2_load_gives_each_rank_its_shard_and_export_gathers(tmp_path):
    from transformers import Qwen3ForCausalLM

    folder = tmp_path / "hf"
    hf_model = save_random_hf(
        Qwen3ForCausalLM(hf_folder_config(tie_word_embeddings=True)), folder, "30KB"
    )
    export_dir = tmp_path / "export"
    result_file = tmp_path / "result.pt"
    run_spawned(
        WORLD,
        "tests.module.model.test_hf_fsdp:fsdp_load_and_export",
        folder=str(folder),
        export_dir=str(export_dir),
        result_file=str(result_file),
    )
    result = torch.load(result_file)

    single = _build(folder, wrap=False)
    load_hf_checkpoint(single, folder)
    single_state = single.state_dict()
    assert result["full"].keys() == single_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(result["full"][key], value, rtol=0, atol=0, msg=key)
    assert result["own_rows"]["model.embed_tokens.token_embedding.b.weight"] == 26

    ids = hf_tokens()
    assert_close_scaled(result["nll"], hf_nll(hf_model.eval(), ids), "FSDP2 per-token NLL")
    exported = Qwen3ForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        assert_close_scaled(
            exported(ids).logits, hf_model(ids).logits, "HF logits after FSDP export"
        )
