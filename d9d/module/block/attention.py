"""Grouped-query self-attention with per-head q/k RMSNorm (Qwen3 style)."""

import torch
from torch import nn

from d9d.module.block.norm import RMSNorm
from d9d.module.block.rope import apply_rotary_pos_emb
from d9d.module.block.sdpa_kernels import grouped_query_sdpa


class GroupedQueryAttention(nn.Module):
    """Causal grouped-query attention through ``scaled_dot_product_attention``.

    Query head ``h`` reads KV head ``h // (num_attention_heads // num_key_value_heads)``.
    Each query and key head is RMS-normalised (one weight of size ``head_dim`` shared by
    the heads) before RoPE. Only the causal mask applies: right padding is harmless.

    Args:
        hidden_size: Model width.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (divides ``num_attention_heads``).
        head_dim: Size of one head.
        rms_norm_eps: Epsilon of the q/k norms.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        rms_norm_eps: float,
    ):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Attends causally over ``hidden_states`` ``(B, S, hidden)``."""
        batch, seq, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.q_norm(self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim))
        k = self.k_norm(self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim))
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        q = apply_rotary_pos_emb(q.transpose(1, 2), cos, sin)
        k = apply_rotary_pos_emb(k.transpose(1, 2), cos, sin)
        out = grouped_query_sdpa(q, k, v.transpose(1, 2), scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def reset_parameters(self) -> None:
        """Re-initialises projections (PyTorch defaults) and q/k norms (ones)."""
        for module in (
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.o_proj,
            self.q_norm,
            self.k_norm,
        ):
            module.reset_parameters()
