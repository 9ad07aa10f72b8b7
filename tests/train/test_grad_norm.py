"""Clipping by the global norm equals a single-device clip_grad_norm_ under every layout."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from d9d.train.grad_norm import clip_grad_norm_, reduction_dims, total_grad_norm
from tests.helpers import run_spawned, scenario_result
from tests.train._grad_norm_scenarios import LAYOUTS

# fp32 norms that differ only by summation order (measured: ~1e-7 relative).
NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def four_rank() -> list[dict]:
    return run_spawned(4, "tests.train._grad_norm_scenarios:four_rank_job", timeout_s=300)


@pytest.mark.parametrize(
    "name", [f"{layout} L2" for layout in LAYOUTS] + ["pp=2 x dp_shard=2 Linf"]
)
def test_layout_norm_equals_single_device(four_rank, name):
    for result in scenario_result(four_rank, name):
        assert result["is_dtensor"], "the layout must hold FSDP2 DTensor shards"
        assert result["norm"] == pytest.approx(result["ref_norm"], rel=NORM_RTOL)
        assert result["clipped_grad_diff"] <= 1e-7


def test_partial_and_strided_gradients(four_rank):
    for result in scenario_result(four_rank, "partial and strided"):
        assert result["partial"] == pytest.approx(result["expected"], rel=NORM_RTOL)
        assert result["strided"] == pytest.approx(result["expected"], rel=NORM_RTOL)


def test_single_process_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    model(torch.randn(4, 5)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    norm = clip_grad_norm_(model.parameters(), 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, c in zip(model.parameters(), clipped, strict=True):
        torch.testing.assert_close(p.grad, c)
    # bf16 gradients are summed in fp32.
    assert total_grad_norm([torch.nn.Parameter(torch.ones(3))]).dtype == torch.float32


def test_non_finite_norm_leaves_gradients_alone():
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, float("nan"), 2.0])
    norm = clip_grad_norm_([param], 0.1)
    assert math.isnan(norm.item())
    assert param.grad[0].item() == 1.0 and param.grad[2].item() == 2.0


def test_reduction_dims_count_every_placement_but_replicate():
    # FSDP2 over a TP-split weight: a strided shard on the dp dim, a shard on the tp dim.
    strided = SimpleNamespace(placements=(_StridedShard(0, split_factor=2), Shard(0)))
    assert not isinstance(strided.placements[0], Shard)  # why isinstance cannot decide
    assert reduction_dims(strided) == (0, 1)
    assert reduction_dims(SimpleNamespace(placements=(Replicate(), Shard(1)))) == (1,)
    assert reduction_dims(SimpleNamespace(placements=(Shard(0), Replicate()))) == (0,)
    assert reduction_dims(SimpleNamespace(placements=(Replicate(),))) == ()
    # A partial gradient is reduced before its norm (see _without_partial); were one to
    # reach this point, its dim holds different values on each rank.
    assert reduction_dims(SimpleNamespace(placements=(Partial(),))) == (0,)
