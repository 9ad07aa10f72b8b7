"""Grouped-query ``scaled_dot_product_attention`` that keeps a fused kernel on CUDA.

SDPA's fused CUDA kernels differ in what they accept: flash attention needs fp16/bf16,
and the memory-efficient kernel takes fp32 but not grouped-query attention
(``enable_gqa=True``; it gained that only after torch 2.13). An fp32 GQA call on CUDA
therefore falls to the math kernel, which materialises the whole ``B x H x S x S``
score matrix: out of memory, or very slow, at S = 4096. Expanding K/V to one head per
query head first (what ``enable_gqa`` means) lets the memory-efficient kernel run; it
costs ``num_attention_heads / num_key_value_heads`` times the K/V memory, small next to
the scores it avoids. Everywhere else ``enable_gqa`` is passed through unchanged.
"""

import torch
import torch.nn.functional as F


def needs_expanded_kv(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a GQA call must expand K/V to reach a fused kernel.

    Args:
        device_type: The device type of the query (``"cuda"``, ``"cpu"``, ...).
        dtype: The dtype of the query.
    """
    return device_type == "cuda" and dtype not in (torch.float16, torch.bfloat16)


def grouped_query_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = True,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` for ``(B, H, S, D)`` queries over fewer K/V heads.

    Query head ``h`` reads K/V head ``h // (H // H_kv)``, as with ``enable_gqa=True``.

    Args:
        query: ``(B, H, S, D)``.
        key: ``(B, H_kv, S, D)``; ``H_kv`` divides ``H``.
        value: ``(B, H_kv, S, D)``.
        scale: Softmax scale.
        is_causal: Causal mask (``attn_mask`` must then be ``None``).
        attn_mask: A boolean or additive mask broadcastable to ``(B, H, S, S)``.

    Returns:
        ``(B, H, S, D)``.
    """
    num_groups = query.shape[1] // key.shape[1]
    if num_groups > 1 and needs_expanded_kv(query.device.type, query.dtype):
        key = key.repeat_interleave(num_groups, dim=1)
        value = value.repeat_interleave(num_groups, dim=1)
        num_groups = 1
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=num_groups > 1,
    )
