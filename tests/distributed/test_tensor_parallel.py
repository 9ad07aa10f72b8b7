"""Tensor parallelism (with sequence parallelism) equals the single-process reference.

Spawned CPU/gloo ranks, fp32. All scenarios of one world size run in one job. Each
compares the loss, the per-token outputs (``logps`` / ``scores``) and every gathered
gradient with a single-process model holding the same weights, relatively: fp32
layouts differ from the reference only by summation order (measured worst: ~1e-7 on the
loss, ~1.3e-6 on a gradient, relative to its largest entry). Every batch packs
several documents in two of its rows.
"""

import pytest
import torch

from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint
from tests.distributed._tp_scenarios import FOUR_RANK_TP, TWO_RANK_TP, reference_model
from tests.helpers import run_spawned, scenario_result

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def two_rank() -> list[dict]:
    return run_spawned(2, "tests.distributed._tp_scenarios:two_rank_job")


@pytest.fixture(scope="module")
def four_rank() -> list[dict]:
    return run_spawned(4, "tests.distributed._tp_scenarios:four_rank_job")


def _check(name: str, spec: dict, per_rank: list[dict]) -> None:
    last = [r for r in per_rank if "loss_rel" in r]
    # Every TP rank of the last stage holds the whole loss and outputs, as plain tensors.
    assert len(last) == len(per_rank) // spec["mesh"].get("pipeline_parallel", 1)
    for r in last:
        assert r["head_type"] == "Tensor"
        assert r["loss_rel"] <= REL_TOL, (name, r["loss_rel"])
        assert r["output_rel"] <= REL_TOL, (name, r["output_rel"])
        if spec.get("snapshot") == "mean":
            assert r["snapshot_rel"] <= REL_TOL, (name, r["snapshot_rel"])
    for r in per_rank:
        assert r["grad_rel"] <= REL_TOL, (name, r["grad_rel"])
        # Complete when backward() returns: no gradient left partial over the TP group.
        assert r["incomplete_grads"] == []
        assert r["graph_breaks"] == 0
        # The builder applies TP between float8 and checkpointing/compile; in the user
        # order (compile preset first) parallelize_* applies it afterwards.
        steps = r["steps"]
        assert ("tensor_parallel" in steps) != spec.get("user_order", False)
        if "compile" in steps and not spec.get("user_order"):
            assert steps.index("tensor_parallel") < steps.index("activation_checkpointing")
    checked = {n for r in per_rank for n in r["checked_params"]}
    assert checked == set(per_rank[0]["all_params"]), "a parameter got no gradient"


@pytest.mark.parametrize("name", list(TWO_RANK_TP))
def test_two_rank_tensor_parallel_matches_reference(two_rank, name):
    _check(name, TWO_RANK_TP[name], scenario_result(two_rank, name))


@pytest.mark.parametrize("name", list(FOUR_RANK_TP))
def test_four_rank_tensor_parallel_matches_reference(four_rank, name):
    _check(name, FOUR_RANK_TP[name], scenario_result(four_rank, name))


def test_parameters_are_sharded_by_the_plan(two_rank):
    placements = scenario_result(two_rank, "tp=2 causal_lm")[0]["placements"]
    # FSDP2 (over a data-parallel dim of size 1 here) comes first, then the tp dim.
    tp = {name: dims[-1] for name, dims in placements.items()}
    layer = "model.layers.0."
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
        assert tp[f"{layer}{proj}.weight"] == "S(0)", proj
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        assert tp[f"{layer}{proj}.weight"] == "S(1)", proj
    for norm in (
        "input_layernorm",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "post_attention_layernorm",
    ):
        assert tp[f"{layer}{norm}.weight"] == "R", norm
    assert tp["model.norm.weight"] == "R"
    for split in ("text", "code", "special"):
        assert tp[f"model.embed_tokens.token_embedding.{split}.weight"] == "S(0)"
        assert tp[f"lm_head.lm_head.{split}.weight"] == "S(0)"


def test_compile_sac_one_graph_for_every_layer(two_rank):
    for name in ("tp=2 causal_lm compile_sac", "tp=2 classification compile_sac user order"):
        for r in scenario_result(two_rank, name):
            assert r["graph_breaks"] == 0
            # One layer graph for both layers; the causal LM adds the compiled
            # softmax-minus-onehot kernel of its vocab-parallel loss.
            assert 1 <= r["new_graphs"] <= 2, (name, r["new_graphs"])


def test_user_errors(two_rank):
    per_rank = scenario_result(two_rank, "errors")
    assert per_rank[0] == per_rank[1], "every rank must raise the same errors"
    errors = per_rank[0]
    expected = {
        "num_attention_heads": "num_attention_heads=3 is not divisible by tensor_parallel=2",
        "num_key_value_heads": "num_key_value_heads=1 is not divisible by tensor_parallel=2",
        "intermediate_size": "intermediate_size=63 is not divisible by tensor_parallel=2",
        "vocab split": "split_vocab_size['text']=41 is not divisible by tensor_parallel=2",
        "sequence length": "sequence length 7 (input_ids) is not divisible by tensor_parallel=2",
    }
    for key, message in expected.items():
        assert errors[key] is not None, f"{key} did not raise ValueError"
        assert message in errors[key], (key, errors[key])
    assert "float8" in errors["float8 on cpu"] and "CUDA" in errors["float8 on cpu"]
    # torch 2.13 cannot compile a checkpointed layer holding DTensor collectives in these
    # two modes; both orders refuse them with the preset and mode named.
    for preset, mode in (
        ("compile_full_ac", "full"),
        ("compile_memory_budget user order", "memory_budget"),
    ):
        message = errors[preset]
        assert message is not None, preset
        assert f"activation_checkpointing.mode={mode!r}" in message
        assert "tensor_parallel=2" in message
    # The refused forward left no rank inside a collective: a right batch still trains.
    assert all(r["good_step_loss"] > 0 for r in per_rank)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp_checkpoints")
    save_model_checkpoint(reference_model(), str(folder / "single"))
    per_rank = run_spawned(2, "tests.distributed._tp_scenarios:checkpoint_job", folder=str(folder))
    return folder, per_rank


@pytest.mark.parametrize(
    "name",
    ["seeded init tp=2 == one process", "single -> tp=2", "tp=2 -> dp_shard=2", "hf under tp=2"],
)
def test_checkpoints_across_tensor_parallel(checkpoints, name):
    _, per_rank = checkpoints
    names = set(reference_model().state_dict())
    for r in scenario_result(per_rank, name):
        # Exactly the reference values, under the unchanged state-dict names.
        assert r["mismatched"] == [], name
        assert set(r["names"]) == names


def test_tensor_parallel_checkpoints_load_in_one_process(checkpoints):
    from d9d.module.model.qwen3_dense.hf_io import load_hf_checkpoint

    folder, _ = checkpoints
    expected = reference_model().state_dict()
    for load in (
        lambda m: load_model_checkpoint(m, str(folder / "tp2")),
        lambda m: load_hf_checkpoint(m, folder / "hf"),
    ):
        model = reference_model()
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        load(model)
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), name
