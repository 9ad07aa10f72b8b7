"""RMSNorm: fp32 math over the last dimension, weight applied after the cast back."""

import pytest
import torch

from d9d.module.block.norm import RMSNorm


def test_rms_norm_matches_formula_and_inits_to_ones():
    norm = RMSNorm(8, eps=1e-6)
    assert torch.equal(norm.weight, torch.ones(8))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8) * 5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))


def test_rms_norm_eps_is_inside_the_square_root():
    norm = RMSNorm(4, eps=1.0)
    x = torch.full((1, 4), 2.0)
    torch.testing.assert_close(norm(x), torch.full((1, 4), 2.0 / 5.0**0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_computes_in_fp32_and_returns_input_dtype(dtype):
    norm = RMSNorm(64, eps=1e-6).to(dtype)
    # Large values: squaring them overflows fp16 and loses the mean in low precision.
    x = (torch.randn(4, 64) * 300).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(out, expected)
