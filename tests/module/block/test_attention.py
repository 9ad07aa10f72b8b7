"""Grouped-query attention against a per-head reference written out explicitly."""

import pytest
import torch

from d9d.module.block.attention import GroupedQueryAttention
from d9d.module.block.rope import RotaryEmbeddingProvider, apply_rotary_pos_emb

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


def make(num_kv_heads=KV_HEADS):
    attn = GroupedQueryAttention(HIDDEN, HEADS, num_kv_heads, HEAD_DIM, rms_norm_eps=1e-6)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.normal_(0, HIDDEN**-0.5)
    rope = RotaryEmbeddingProvider(HEAD_DIM, 10000.0, 64)
    return attn, rope


def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def reference(attn, x, cos, sin):
    """Loops over heads: q/k norm, then RoPE, causal softmax(q k^T / sqrt(D)) v."""
    batch, seq, _ = x.shape
    q = (x @ attn.q_proj.weight.T).view(batch, seq, HEADS, HEAD_DIM)
    k = (x @ attn.k_proj.weight.T).view(batch, seq, -1, HEAD_DIM)
    v = (x @ attn.v_proj.weight.T).view(batch, seq, -1, HEAD_DIM)
    group = HEADS // k.shape[2]
    causal = torch.ones(seq, seq).tril().bool()
    heads = []
    for h in range(HEADS):
        qh = rms(q[:, :, h], attn.q_norm.weight)[:, None]
        kh = rms(k[:, :, h // group], attn.k_norm.weight)[:, None]
        qh = apply_rotary_pos_emb(qh, cos, sin)[:, 0]
        kh = apply_rotary_pos_emb(kh, cos, sin)[:, 0]
        scores = qh @ kh.transpose(1, 2) / HEAD_DIM**0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads.append(probs @ v[:, :, h // group])
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_matches_per_head_reference(num_kv_heads):
    attn, rope = make(num_kv_heads)
    x = torch.randn(2, 7, HIDDEN)
    cos, sin = rope(torch.arange(7).expand(2, 7))
    torch.testing.assert_close(attn(x, (cos, sin)), reference(attn, x, cos, sin))


def test_attention_has_no_bias_and_right_padding_does_not_change_real_tokens():
    attn, rope = make()
    assert all(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    x = torch.randn(1, 5, HIDDEN)
    padded = torch.cat([x, torch.randn(1, 3, HIDDEN)], dim=1)
    short = attn(x, rope(torch.arange(5)[None]))
    long = attn(padded, rope(torch.arange(8)[None]))
    torch.testing.assert_close(long[:, :5], short)


def test_attention_is_causal():
    attn, rope = make()
    x = torch.randn(1, 6, HIDDEN)
    y = x.clone()
    y[:, 4] += 1.0
    pe = rope(torch.arange(6)[None])
    out_x, out_y = attn(x, pe), attn(y, pe)
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4])
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


def test_reset_parameters_sets_norms_to_ones():
    attn, _ = make()
    attn.reset_parameters()
    assert torch.equal(attn.q_norm.weight, torch.ones(HEAD_DIM))
    assert torch.equal(attn.k_norm.weight, torch.ones(HEAD_DIM))
    assert attn.q_proj.weight.abs().max() <= HIDDEN**-0.5
