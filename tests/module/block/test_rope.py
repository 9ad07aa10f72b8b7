"""Rotary embeddings, "half" layout."""

import math

import torch

from d9d.module.block.rope import RotaryEmbeddingProvider, apply_rotary_pos_emb


def reference_tables(head_dim, base, positions):
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def test_tables_follow_the_formula_and_lookup_by_position_ids():
    rope = RotaryEmbeddingProvider(head_dim=8, base=500.0, max_position_ids=64)
    position_ids = torch.tensor([[0, 1, 63], [7, 7, 2]])
    cos, sin = rope(position_ids)
    assert cos.shape == sin.shape == (2, 3, 8)
    ref_cos, ref_sin = reference_tables(8, 500.0, position_ids)
    # fp32 angles up to 63 rad: a few 1e-6 absolute rounding error.
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0.0, atol=1e-5)
    # Position 1, first pair: angle 1 rad; last frequency: base ** (-6/8).
    assert math.isclose(sin[0, 1, 0].item(), math.sin(1.0), rel_tol=1e-6)
    assert math.isclose(cos[0, 1, 3].item(), math.cos(500.0 ** (-6 / 8)), rel_tol=1e-6)


def test_tables_are_non_persistent_and_rebuilt_after_to_empty():
    with torch.device("meta"):
        rope = RotaryEmbeddingProvider(head_dim=16, base=10000.0, max_position_ids=32)
    assert rope.state_dict() == {}
    rope.to_empty(device="cpu")
    for buffer in rope.buffers():
        buffer.fill_(float("nan"))
    rope.reset_parameters()
    eager = RotaryEmbeddingProvider(head_dim=16, base=10000.0, max_position_ids=32)
    ids = torch.arange(32)[None]
    for got, want in zip(rope(ids), eager(ids), strict=True):
        assert torch.equal(got, want)


def test_apply_rotary_is_rotate_half_formula():
    x = torch.randn(2, 3, 5, 8)  # (B, heads, S, D)
    rope = RotaryEmbeddingProvider(head_dim=8, base=10000.0, max_position_ids=16)
    cos, sin = rope(torch.arange(5).expand(2, 5))
    out = apply_rotary_pos_emb(x, cos, sin)
    # Pair (i, i + D/2) is rotated by angle pos * inv_freq[i].
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = cos[:, None, :, :4], sin[:, None, :, :4]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(out, expected)
    # A rotation keeps the norm; position 0 is the identity.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])


def test_rotated_dot_products_depend_only_on_relative_position():
    rope = RotaryEmbeddingProvider(head_dim=8, base=100.0, max_position_ids=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pos_q, pos_k):
        cq, sq = rope(torch.tensor([[pos_q]]))
        ck, sk = rope(torch.tensor([[pos_k]]))
        return (apply_rotary_pos_emb(q, cq, sq) * apply_rotary_pos_emb(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 5), rtol=1e-3, atol=1e-3)
