"""Packed batches (several documents per row) under pipelining and FSDP2 on gloo.

Each layout must equal the single-process model on the same packed batch: the document
mask is rebuilt from ``position_ids`` on every stage and microbatch. fp32 throughout;
the differences are summation order only (as for unpacked layouts, ~1e-7).
"""

import pytest

from d9d.module.block.document_mask import document_ids_from_position_ids
from tests.distributed._packed_scenarios import PACKED_LAYOUTS, packed_global_batch
from tests.helpers import run_spawned, scenario_result

LOSS_TOL = 5e-6
GRAD_TOL = 1e-6


@pytest.fixture(scope="module")
def two_rank() -> list[dict]:
    return run_spawned(
        2, "tests.distributed._packed_scenarios:two_rank_job", names=list(PACKED_LAYOUTS)
    )


def test_the_batch_is_really_packed():
    batch = packed_global_batch()
    docs_per_row = document_ids_from_position_ids(batch["position_ids"]).amax(1) + 1
    assert docs_per_row.max() >= 4 and docs_per_row.min() == 1
    # Continuation chunks: rows that start past position 0.
    assert sorted(batch["position_ids"][:, 0].tolist())[-2:] == [16, 32]


@pytest.mark.parametrize("name", list(PACKED_LAYOUTS))
def test_packed_layout_equals_single_process(two_rank, name):
    per_rank = scenario_result(two_rank, name)
    losses = [r["loss_diff"] for r in per_rank if "loss_diff" in r]
    assert losses and max(losses) <= LOSS_TOL, losses
    assert max(r["logps_diff"] for r in per_rank if "logps_diff" in r) <= 1e-5
    assert max(r["grad_diff"] for r in per_rank) <= GRAD_TOL
    assert {n for r in per_rank for n in r["checked_params"]} == set(per_rank[0]["all_params"])
    assert all(r["graph_breaks"] == 0 for r in per_rank)
