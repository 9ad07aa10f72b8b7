"""Grouped-query SDPA: the K/V expansion that keeps fp32 on a fused CUDA kernel is exact."""

import pytest
import torch

from d9d.module.block import sdpa_kernels
from d9d.module.block.sdpa_kernels import grouped_query_sdpa, needs_expanded_kv


@pytest.mark.parametrize(
    ("device_type", "dtype", "expand"),
    [
        ("cuda", torch.float32, True),  # flash needs fp16/bf16; efficient has no GQA
        ("cuda", torch.bfloat16, False),
        ("cuda", torch.float16, False),
        ("cpu", torch.float32, False),
        ("cpu", torch.bfloat16, False),
    ],
)
def test_only_fp32_on_cuda_expands(device_type, dtype, expand):
    assert needs_expanded_kv(device_type, dtype) is expand


def _inputs():
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 12, 16), (2, 2, 12, 16), (2, 2, 12, 16)]  # 4 query heads per KV head
    return [
        torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in shapes
    ]


@pytest.mark.parametrize("mask", [None, "boolean"])
def test_expanded_kv_equals_enable_gqa_outputs_and_gradients(monkeypatch, mask):
    attn_mask = None
    if mask == "boolean":
        attn_mask = torch.ones(12, 12, dtype=torch.bool).tril()
        attn_mask[5:, :3] = False  # a packed-documents style block mask
    kwargs = dict(scale=0.25, is_causal=attn_mask is None, attn_mask=attn_mask)
    results = []
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        calls.append((k.shape[1], kw["enable_gqa"]))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(sdpa_kernels.F, "scaled_dot_product_attention", recording_sdpa)
    for expand in (False, True):
        monkeypatch.setattr(sdpa_kernels, "needs_expanded_kv", lambda *_, e=expand: e)
        q, k, v = _inputs()
        out = grouped_query_sdpa(q, k, v, **kwargs)
        out.square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    # Unexpanded: 2 K/V heads with enable_gqa; expanded: 8 heads, no GQA flag.
    assert calls == [(2, True), (8, False)]
    for gqa, expanded in zip(*results, strict=True):
        torch.testing.assert_close(expanded, gqa, rtol=1e-12, atol=1e-12)
