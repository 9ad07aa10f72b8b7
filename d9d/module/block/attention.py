"""Grouped-query self-attention with per-head q/k RMSNorm (Qwen3 style)."""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from d9d.module.block.norm import RMSNorm
from d9d.module.block.rope import apply_rotary_pos_emb
from d9d.module.block.sdpa_kernels import grouped_query_sdpa

KeyValueGather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps local ``(B, H_kv, S, D)`` K and V to those of every context-parallel rank."""


class GroupedQueryAttention(nn.Module):
    """Causal grouped-query attention through ``scaled_dot_product_attention``.

    Query head ``h`` reads KV head ``h // (num_attention_heads // num_key_value_heads)``.
    Each query and key head is RMS-normalised (one weight of size ``head_dim`` shared by
    the heads) before RoPE. Without ``attention_mask`` only the causal mask applies (right
    padding is then harmless); packed rows pass the document mask built once per stage
    forward by ``d9d.module.block.document_mask``.

    Under context parallelism ``kv_gather`` is set (by
    ``d9d.module.parallelism.model.qwen3_dense_context_parallel``): K and V, after the
    k-norm and RoPE, are gathered from every rank of the context-parallel group, and the
    local queries attend to all of them under the mask the model built for that layout.

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
        self.kv_gather: KeyValueGather | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """Attends causally over ``hidden_states`` ``(B, S, hidden)``.

        Args:
            hidden_states: ``(B, S, hidden)``.
            position_embeddings: RoPE ``(cos, sin)``, each ``(B, S, head_dim)``.
            attention_mask: ``None`` for plain causal attention; a boolean
                ``(B, 1, S, S_kv)`` mask (True = attend, causality included) or its
                additive form (0 / -inf) for SDPA; or a FlexAttention ``BlockMask``.
                ``S_kv`` is ``S`` except under context parallelism (all the gathered
                keys), which always passes a mask.
        """
        batch, seq, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.q_norm(self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim))
        k = self.k_norm(self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim))
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        q = apply_rotary_pos_emb(q.transpose(1, 2), cos, sin)
        k = apply_rotary_pos_emb(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if self.kv_gather is not None:
            if attention_mask is None:
                raise ValueError(
                    "context-parallel attention needs the mask of its local queries over "
                    "the gathered keys (the model's forward builds it)"
                )
            k, v = self.kv_gather(k, v)
        scale = self.head_dim**-0.5
        if attention_mask is None:
            out = grouped_query_sdpa(q, k, v, scale=scale)
        elif isinstance(attention_mask, BlockMask):
            enable_gqa = self.num_attention_heads != self.num_key_value_heads
            out = _flex_attention(q, k, v, attention_mask, scale, enable_gqa)
        else:
            out = grouped_query_sdpa(
                q, k, v, scale=scale, is_causal=False, attn_mask=attention_mask
            )
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


@functools.cache
def _compiled_flex_attention():
    # Outside a compiled region, flex_attention falls back to a dense reference
    # implementation; compiled, it is the block-sparse fused kernel. dynamic=False: one
    # kernel per shape, and a new document layout of that shape is only new data.
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    enable_gqa: bool,
) -> torch.Tensor:
    seq = q.shape[-2]
    # The document block masks cover the queries and keys padded to whole blocks (see
    # d9d.module.block.document_mask.flex_document_block_mask); padded keys belong to no
    # real document, so real queries never see them.
    q_pad = block_mask.seq_lengths[0] - seq
    kv_pad = block_mask.seq_lengths[1] - k.shape[-2]
    if q_pad:
        q = F.pad(q, (0, 0, 0, q_pad))
    if kv_pad:
        k, v = (F.pad(t, (0, 0, 0, kv_pad)) for t in (k, v))
    if torch.compiler.is_compiling():
        # Inside a compiled layer the call is traced into the layer's graph.
        out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    else:
        out = _compiled_flex_attention()(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa
        )
    return out[..., :seq, :] if q_pad else out
