"""Hidden-state aggregators: no and mean."""

from enum import StrEnum

import pytest
import torch

from d9d.module.block.hidden_states_aggregator import (
    HiddenStatesAggregationMode,
    create_hidden_states_aggregator,
)


def test_mode_is_a_str_enum_with_no_and_mean():
    assert issubclass(HiddenStatesAggregationMode, StrEnum)
    assert {m.value for m in HiddenStatesAggregationMode} == {"no", "mean"}
    assert HiddenStatesAggregationMode("mean") is HiddenStatesAggregationMode.mean


def test_no_mode_returns_none():
    agg = create_hidden_states_aggregator(HiddenStatesAggregationMode.no, None)
    agg.add_hidden_states(torch.randn(2, 3, 4))
    assert agg.pack_with_snapshot(None) is None
    assert agg.pack_with_snapshot(torch.randn(1, 2, 4)) is None


def test_mean_mode_requires_a_2d_mask():
    with pytest.raises(ValueError, match="hidden_states_agg_mask"):
        create_hidden_states_aggregator(HiddenStatesAggregationMode.mean, None)
    with pytest.raises(ValueError, match="hidden_states_agg_mask"):
        create_hidden_states_aggregator("mean", torch.ones(2, 3, 1))
    with pytest.raises(ValueError):
        create_hidden_states_aggregator("sum", torch.ones(2, 3))


@pytest.mark.parametrize("shape", [(2, 1), (1, 4), (2, 5)])
def test_mean_rejects_a_mask_that_does_not_match_batch_and_seq(shape):
    agg = create_hidden_states_aggregator("mean", torch.ones(shape))
    with pytest.raises(ValueError, match="hidden_states_agg_mask"):
        agg.add_hidden_states(torch.randn(2, 4, 3))


def test_mean_is_masked_and_appended_to_the_incoming_snapshot():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    agg = create_hidden_states_aggregator("mean", mask)
    h1, h2 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    agg.add_hidden_states(h1)
    agg.add_hidden_states(h2)
    incoming = torch.randn(5, 2, 3)
    out = agg.pack_with_snapshot(incoming)
    assert out.shape == (7, 2, 3)
    assert torch.equal(out[:5], incoming)
    for row, h in zip(out[5:], (h1, h2), strict=True):
        torch.testing.assert_close(row[0], h[0, :2].mean(0))
        torch.testing.assert_close(row[1], h[1, 1:].mean(0))
    fresh = create_hidden_states_aggregator("mean", mask)
    fresh.add_hidden_states(h1)
    assert fresh.pack_with_snapshot(None).shape == (1, 2, 3)


def test_mean_is_computed_in_fp32_and_cast_back():
    h = torch.randn(2, 5, 512).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    agg = create_hidden_states_aggregator("mean", mask)
    agg.add_hidden_states(h)
    out = agg.pack_with_snapshot(None)[0]
    assert out.dtype == torch.bfloat16
    m = mask.double()
    exact = ((h.double() * m[..., None]).sum(1) / m.sum(1, keepdim=True)).to(torch.bfloat16)
    # fp32 math rounds (almost) only once, at the cast: a rare double rounding may differ.
    # Done in bf16 (1/3 and 1/4 weights, products and sums rounded) ~100-250 of the 1024
    # values differ from the exactly rounded mean.
    assert (out != exact).sum() <= 5
    bf16_weights = (mask / mask.sum(1, keepdim=True)).to(torch.bfloat16)
    in_bf16 = (h * bf16_weights[..., None]).sum(1)
    assert (in_bf16 != exact).sum() > 50
