"""Checkpoint integrity, async saves, branches and the HF export on two gloo ranks."""

import pytest

from tests.helpers import run_spawned, scenario_result
from tests.train._loop_scenarios import write_corpus, write_hf_init


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ckpt_layouts")
    corpus = write_corpus(folder)
    init = write_hf_init(folder, corpus)
    return run_spawned(
        2,
        "tests.train._checkpoint_scenarios:two_ranks",
        timeout_s=540,
        corpus=str(corpus),
        init=str(init),
    )


@pytest.mark.parametrize("layout", ["dp_shard=2", "pp=2 (1f1b)"])
def test_both_ranks_files_are_verified(results, layout):
    per_rank = scenario_result(results, f"integrity {layout}")
    r = per_rank[0]
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank0.pt", "rng/rank1.pt"} <= set(r["files"])
    # Rank 1's tensor file was corrupted: both ranks refuse with the same message.
    assert r["refusal"] is not None and per_rank[1]["refusal"] == r["refusal"]
    assert f"{r['shard']} has CRC-32 " in r["refusal"]
    assert f"the newest verified checkpoint is {r['previous']}" in r["refusal"]
    # A background save (own process group) trains and writes exactly as a sync one.
    assert r["async"] == r["sync"]
    assert r["async_files"] == r["files"]
    assert r["async_left"] == ["lineage.json", "step-2", "step-4"]


def test_rollback_under_dp_shard_2(results):
    r = scenario_result(results, "rollback dp_shard=2")[0]
    assert r["left"] == ["lineage.json", "step-2", "step-4", "step-4.b1", "step-6", "step-6.b1"]
    assert any(f"resumed from {r['folder']}/step-4.b1 at step 4" in line for line in r["log"])
    assert r["metrics"] == list(range(1, 7))


def test_export_is_written_by_rank_0_alone_and_holds_the_weights(results):
    ranks = scenario_result(results, "export dp_shard=2")
    r = ranks[0]
    assert r["written"] == ["config.json", "model.safetensors"]
    assert r["missing"] == [] and r["equal"]
    assert ranks[1] == {"rank": 1}
