"""Pooling masks built from attention masks (right padding)."""

import pytest
import torch

from d9d.dataset import token_pooling_mask_from_attention_mask

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_first_selects_column_zero():
    out = token_pooling_mask_from_attention_mask(MASK, "first")
    expected = torch.zeros_like(MASK)
    expected[:, 0] = 1
    assert torch.equal(out, expected)


def test_last_selects_the_last_real_token():
    out = token_pooling_mask_from_attention_mask(MASK, "last")
    expected = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(out, expected)
    assert out.dtype == MASK.dtype


def test_all_is_the_mask_itself_and_a_copy():
    out = token_pooling_mask_from_attention_mask(MASK, "all")
    assert torch.equal(out, MASK)
    out[0, 0] = 7
    assert MASK[0, 0] == 1


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_keeps_the_input_dtype(dtype):
    for kind, expected in [("first", [1, 0, 0, 0, 0]), ("last", [0, 0, 1, 0, 0])]:
        out = token_pooling_mask_from_attention_mask(MASK.to(dtype), kind)
        assert out.dtype == dtype
        assert out[0].long().tolist() == expected


@pytest.mark.parametrize("pooling_type", ["mean", "LAST", "", "cls"])
def test_unknown_pooling_type_raises(pooling_type):
    with pytest.raises(ValueError, match="pooling_type"):
        token_pooling_mask_from_attention_mask(MASK, pooling_type)


def test_bad_masks_raise():
    with pytest.raises(ValueError):
        token_pooling_mask_from_attention_mask(MASK[0], "last")
    with pytest.raises(ValueError):
        token_pooling_mask_from_attention_mask(torch.tensor([[1, 1], [0, 0]]), "last")
