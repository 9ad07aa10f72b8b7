"""Every parallel layout equals the single-process reference (spawned CPU/gloo ranks).

All scenarios of one world size run in one spawned job (process start-up and gloo
rendezvous dominate on a 2-core machine); the tests below check its per-layout results.
Tolerances: fp32 layouts differ from the reference only by summation order (measured
worst: ~5e-7 on the loss, ~3e-8 on a gradient); bf16 parameters are compared loosely.
"""

import pytest

from tests.distributed._scenarios import FOUR_RANK_LAYOUTS, TWO_RANK_LAYOUTS
from tests.helpers import run_spawned, scenario_result

FP32_LOSS_TOL = 5e-6
FP32_GRAD_TOL = 1e-6
BF16_TOL = {"loss": 5e-3, "grad": 5e-3, "output": 5e-2}


@pytest.fixture(scope="module")
def two_rank() -> list[dict]:
    return run_spawned(2, "tests.distributed._scenarios:two_rank_job", names=list(TWO_RANK_LAYOUTS))


@pytest.fixture(scope="module")
def four_rank() -> list[dict]:
    return run_spawned(
        4, "tests.distributed._scenarios:four_rank_job", names=list(FOUR_RANK_LAYOUTS)
    )


def _worst(per_rank: list[dict], key: str) -> float:
    values = [r[key] for r in per_rank if key in r]
    assert values, f"no rank reported {key}"
    return max(values)


def _check_layout(name: str, spec: dict, per_rank: list[dict]) -> None:
    bf16 = "bf16" in name
    loss_tol = BF16_TOL["loss"] if bf16 else FP32_LOSS_TOL
    grad_tol = BF16_TOL["grad"] if bf16 else FP32_GRAD_TOL
    # eval() through the same step object: the same loss on every rank, no gradient touched.
    assert len([r for r in per_rank if "eval_loss_diff" in r]) == len(per_rank)
    assert _worst(per_rank, "eval_loss_diff") <= loss_tol, name
    assert all(r["eval_kept_grads"] for r in per_rank), name
    worst_loss = _worst(per_rank, "loss_diff")
    worst_grad = _worst(per_rank, "grad_diff")
    print(f"{name}: worst |loss diff| {worst_loss:.3g}, worst |grad diff| {worst_grad:.3g}")
    assert worst_loss <= loss_tol, name
    assert worst_grad <= grad_tol, name
    assert _worst(per_rank, "output_diff") <= (BF16_TOL["output"] if bf16 else 1e-5)
    if spec.get("snapshot") == "mean":
        assert _worst(per_rank, "snapshot_diff") <= 1e-5
    # Every reference parameter got a gradient on some rank (no stage lost a layer).
    checked = {n for r in per_rank for n in r["checked_params"]}
    assert checked == set(per_rank[0]["all_params"])

    pipelined = spec["mesh"].get("pipeline_parallel", 1) > 1
    for r in per_rank:
        flags = r["reshard_after_forward"]
        assert flags["layers"] and all(f == (not pipelined) for f in flags["layers"])
        assert all(f == (not pipelined) for f in flags["embedding"])
        assert not any(flags["norm+head"]), "the head must never be resharded after forward"
        assert r["graph_breaks"] == 0
    if bf16:
        later = [d for r in per_rank for d in r["stage_input_dtypes"] if "hidden_states" in d]
        assert later and all(d["hidden_states"] == "torch.bfloat16" for d in later)


@pytest.mark.parametrize("name", list(TWO_RANK_LAYOUTS))
def test_two_rank_layout_matches_reference(two_rank, name):
    _check_layout(name, TWO_RANK_LAYOUTS[name], scenario_result(two_rank, name))


@pytest.mark.parametrize("name", list(FOUR_RANK_LAYOUTS))
def test_four_rank_layout_matches_reference(four_rank, name):
    _check_layout(name, FOUR_RANK_LAYOUTS[name], scenario_result(four_rank, name))


def test_compile_sac_layers_compile_once_with_fsdp_outside(two_rank):
    # FSDP2 hooks run around the compiled layer: a hook inside would break the graph
    # (fullgraph=True fails) or add a graph per unit.
    compiled = [name for name in TWO_RANK_LAYOUTS if "compile_sac" in name]
    assert compiled
    for name in compiled:
        for r in scenario_result(two_rank, name):
            assert r["graph_breaks"] == 0
            # One layer graph serves every layer; a rank holding the LM head also compiles
            # the two fused loss kernels (d9d.module.block.chunked_nll).
            assert r["new_graphs"] <= 1 + 2, "one graph must serve every layer"
    assert sum(r[name]["new_graphs"] for name in compiled for r in two_rank) >= 1


def test_user_errors(two_rank):
    errors = scenario_result(two_rank, "errors")[0]
    assert "world size is 2" in errors["bad_product"]
    for key, message in errors.items():
        if key.startswith("context_parallel") and not key.endswith(":classification"):
            # Context parallelism runs the causal LM and the backbone (see
            # test_context_parallel.py); only the classification head is refused.
            assert message is None, (key, message)
            continue
        assert message is not None, f"{key} did not raise ValueError"
        if key.startswith("tensor_parallel:"):
            assert "tensor parallelism" in message
        elif key.startswith("context_parallel"):
            assert "context parallelism does not support Qwen3DenseForClassification" in message
    assert "mesh_dim_names" in errors["unnamed_mesh"]
    assert "exactly one stage per rank" in errors["gpipe_with_two_stages_per_rank"]
    assert "looped placement" in errors["stages_not_looped"]
    assert len(errors) == 1 + 3 * 3 + 2 + 1


def _check_checkpoint(per_rank: list[dict]) -> None:
    reference = set(per_rank[0]["reference_keys"])
    for r in per_rank:
        assert r["mismatched"] == [], "a tensor changed in the round trip"
        assert r["rope_tables_rebuilt"], "RoPE tables not rebuilt by the checkpoint load"
        # Stored under the unwrapped state-dict names (model.layers.<i>...), whatever the
        # layout.
        assert set(r["stored_keys"]) == reference
    assert {n for r in per_rank for n in r["loaded_names"]} == reference


def test_checkpoint_dp_shard_to_pp(two_rank):
    _check_checkpoint(scenario_result(two_rank, "checkpoint dp_shard=2 -> pp=2"))


def test_checkpoint_hsdp_to_interleaved_pp_x_fsdp(four_rank):
    key = "checkpoint dp_replicate=2 x dp_shard=2 -> pp=2 (2 stages/rank) x dp_shard=2"
    _check_checkpoint(scenario_result(four_rank, key))


def test_float8_all_gather(two_rank):
    for result in scenario_result(two_rank, "float8 all-gather dp_shard=2"):
        # Weights really travel as float8, and scales are precomputed after each step.
        assert result["gathered_dtypes"] == ["torch.float8_e4m3fn"]
        assert result["num_float8_gathers"] > 0
        assert all(result["scales_precomputed"])
        assert max(result["loss_diffs"]) <= 1e-6
        assert max(result["grad_diffs"]) <= 1e-6


def test_hsdp_flattens_two_replicate_dims_and_sums(four_rank):
    for result in scenario_result(four_rank, "hsdp dp_replicate=2 x cp_replicate=2"):
        assert result["mesh_shape"] == [4, 1]
        assert result["placements"] == ["R", "S(0)"]  # (replicate, shard) HSDP
        assert result["grad_diff"] <= 1e-5


def test_schedule_refuses_a_mis_sized_batch_on_every_rank(two_rank):
    per_rank = scenario_result(two_rank, "schedule batch checks")
    # Both ranks raise the same error (nobody waits on a peer), naming the problem.
    assert per_rank[0]["errors"] == per_rank[1]["errors"]
    errors = per_rank[0]["errors"]
    for rows in ("6 rows", "16 rows"):
        message = errors[rows]
        assert message is not None, rows
        assert f"batch size {rows.split()[0]}" in message and "n_microbatches=4" in message
        assert "8 rows" in message
    assert "labels (8, 7) (expected (8, 8))" in errors["labels shape"]
    assert "position_ids" in errors["missing position_ids"]
    assert "input_ids" in errors["token out of range"] and "103" in errors["token out of range"]
    assert "input_ids must hold integer ids" in errors["float input_ids"]
    # The refused batches left nothing behind: a right batch still trains, and every
    # pipeline rank reports its global loss.
    losses = [r["good_step_loss"] for r in per_rank]
    assert losses[0] == losses[1] and losses[0] > 0
