"""Context parallelism equals the single-process reference (spawned CPU/gloo ranks, fp32).

All scenarios of one world size run in one job. Each CP rank trains on the head-tail
shard of its rows; its loss, the logps of each of its tokens and every gathered gradient
are compared with one process holding the same weights, relatively
(``tests.helpers.rel_err``). fp32 layouts differ from the reference only by summation
order (measured worst: ~1.7e-7 on the loss, ~7e-8 on the logps, ~8e-7 on a gradient,
tp=2 x cp=2 and compile_sac the largest), so 1e-5 leaves an order of magnitude. Two
batches of different document layouts run per scenario (a compiled layer must not
recompile for the second); documents cross the chunk and the rank boundaries. The
float8 scenario is compared with a one-process float8 model: each CP rank scales its own
tokens' activations, so the bound is twice float8's own error against fp32.
"""

import pytest
import torch

from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint
from tests.distributed._cp_scenarios import (
    FOUR_RANK_CP,
    SEQ,
    TWO_RANK_CP,
    reference_model,
)
from tests.helpers import run_spawned, scenario_result

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cp_checkpoints")
    save_model_checkpoint(reference_model(), str(folder / "single"))
    return folder


@pytest.fixture(scope="module")
def two_rank(checkpoint_folder) -> list[dict]:
    return run_spawned(
        2, "tests.distributed._cp_scenarios:two_rank_job", folder=str(checkpoint_folder)
    )


@pytest.fixture(scope="module")
def four_rank() -> list[dict]:
    return run_spawned(4, "tests.distributed._cp_scenarios:four_rank_job")


def _layers_per_stage(spec: dict) -> int:
    return spec.get("num_layers", 2) // spec["mesh"].get("pipeline_parallel", 1)


def _check(name: str, spec: dict, per_rank: list[dict]) -> None:
    float8 = isinstance(spec.get("compile_config"), dict)
    for r in per_rank:
        steps = r["steps"]
        assert len(steps) == 2
        for step in steps:
            if float8:
                # Each CP rank scales its own tokens' activations (as a data-parallel
                # rank does): the result moves by float8 rounding, of the size of
                # float8's own error against fp32 on the same step.
                bound = 2 * max(r["float8_vs_fp32"])
                assert step["grad_rel"] <= bound, (name, step["grad_rel"], bound)
                assert step.get("logps_rel", 0.0) <= 1e-2, (name, step)
                continue
            if "loss_rel" in step:
                assert step["loss_rel"] <= REL_TOL, (name, step["loss_rel"])
                assert step["logps_rel"] <= REL_TOL, (name, step["logps_rel"])
            assert step["grad_rel"] <= REL_TOL, (name, step["grad_rel"])
            if spec.get("snapshot") == "mean":
                assert step["snapshot_rel"] <= REL_TOL, (name, step["snapshot_rel"])
            # Complete when backward() returns: every gradient has its parameter's layout.
            assert step["incomplete_grads"] == [], name
            # One K/V all-gather per layer and microbatch (never repeated in backward),
            # one reduce-scatter per layer in backward, one position gather per forward.
            microbatches = 2 if spec.get("schedule") else 1
            layers = _layers_per_stage(spec)
            assert step["collectives"] == {
                "kv_gather": layers * microbatches,
                "position_gather": microbatches,
                "kv_reduce_scatter": layers * microbatches,
            }, (name, step["collectives"])
        assert r["graph_breaks"] == 0, name
        assert r["later_new_graphs"] == 0, f"{name}: the second document layout recompiled"
    # The ranks of a CP group hold every token of the row exactly once.
    cp = spec["mesh"].get("context_parallel_shard", 1) * spec["mesh"].get(
        "context_parallel_replicate", 1
    )
    for rows in {tuple(r["rows"]) for r in per_rank}:
        held = sorted({t for r in per_rank if tuple(r["rows"]) == rows for t in r["tokens"]})
        assert held == list(range(SEQ)), (name, rows)
        assert all(len(r["tokens"]) == SEQ // cp for r in per_rank)
    checked = {n for r in per_rank for n in r["checked_params"]}
    assert checked == set(per_rank[0]["all_params"]), "a parameter got no gradient"


@pytest.mark.parametrize("name", list(TWO_RANK_CP))
def test_two_rank_context_parallel_matches_reference(two_rank, name):
    _check(name, TWO_RANK_CP[name], scenario_result(two_rank, name))


@pytest.mark.parametrize("name", list(FOUR_RANK_CP))
def test_four_rank_context_parallel_matches_reference(four_rank, name):
    _check(name, FOUR_RANK_CP[name], scenario_result(four_rank, name))


def test_compile_sac_one_graph_for_every_layer(two_rank):
    for r in scenario_result(two_rank, "cp=2 compile_sac"):
        assert r["graph_breaks"] == 0
        # One graph for both layers (gather, mask and all), plus the LM head's compiled
        # loss kernels (forward and backward): 3; a graph per layer would make 4.
        # Nothing new on the second layout.
        assert 1 <= r["first_step_graphs"] <= 3, r["first_step_graphs"]
        assert r["later_new_graphs"] == 0


def test_weights_are_sharded_over_dp_cp_shard_and_replicated_over_cp_replicate(two_rank, four_rank):
    layer = "model.layers.0.self_attn.q_proj.weight"
    shard = scenario_result(two_rank, "cp=2 packed rows")[0]
    assert shard["mesh_dims"][layer] == ["dp_cp_shard"]
    assert shard["placements"][layer] == ["S(0)"]
    replicate = scenario_result(two_rank, "cp_replicate=2 packed rows")[0]
    assert replicate["mesh_dims"][layer] == ["cp_replicate", "dp_cp_shard"]
    assert replicate["placements"][layer] == ["R", "S(0)"]
    # dp_shard=2 x cp=2: one shard dim of 4 ranks.
    both = scenario_result(four_rank, "dp_shard=2 x cp=2")[0]
    assert both["mesh_dims"][layer] == ["dp_cp_shard"]


def test_user_errors_before_any_communication(two_rank):
    per_rank = scenario_result(two_rank, "errors")
    messages = [{k: v for k, v in r.items() if k != "good_step_loss"} for r in per_rank]
    assert messages[0] == messages[1], "every rank must raise the same errors"
    errors = per_rank[0]
    expected = {
        "shard seq": "sequence length 14 is not divisible by 2 x context-parallel degree = 4",
        "model local seq": (
            "local sequence length 7 x context-parallel degree 2 = 14 is not divisible by 2 x "
            "context-parallel degree = 4"
        ),
        "classification": "context parallelism does not support Qwen3DenseForClassification",
        "flex backward on cpu": "'flex' has no backward on the CPU",
    }
    for key, message in expected.items():
        assert errors[key] is not None, f"{key} did not raise ValueError"
        assert message in errors[key], (key, errors[key])
    # No rank was left inside a collective: a right batch still trains.
    assert all(r["good_step_loss"] > 0 for r in per_rank)


def test_checkpoints_move_between_cp_and_one_process(two_rank, checkpoint_folder):
    reference = reference_model().state_dict()
    for r in scenario_result(two_rank, "single -> cp=2"):
        assert r["mismatched"] == []
        assert set(r["names"]) == set(reference)
    # The checkpoint written under cp=2 loads into one process, exactly.
    torch.manual_seed(123)
    fresh = reference_model()
    with torch.no_grad():
        for param in fresh.parameters():
            param.normal_()
    load_model_checkpoint([fresh], str(checkpoint_folder / "cp2"))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, reference[name]), name
