"""Rotary position embeddings, "half" layout (HF ``rotate_half``)."""

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (``(B, heads, S, D)``) by the angles whose cos/sin are ``(B, S, D)``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class RotaryEmbeddingProvider(nn.Module):
    """Holds cos/sin tables for every position and looks them up by ``position_ids``.

    The tables are non-persistent buffers (not in the state dict); ``reset_parameters``
    rebuilds them, so a module built on ``meta`` and moved with ``to_empty`` is correct
    after ``reset_parameters()``.

    Args:
        head_dim: Size of one attention head (even).
        base: RoPE frequency base.
        max_position_ids: Number of positions the tables cover.
    """

    def __init__(self, head_dim: int, base: float, max_position_ids: int):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.max_position_ids = max_position_ids
        self.register_buffer("cos", torch.empty(max_position_ids, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_position_ids, head_dim), persistent=False)
        self.reset_parameters()
        # The tables are not in the state dict, so a module materialised with to_empty and
        # then filled by any loader (load_state_dict, DCP, HF) would keep garbage tables:
        # rebuild them after every load.
        self.register_load_state_dict_post_hook(lambda module, _: module.reset_parameters())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recomputes the cos/sin tables (in fp32, then stored in the buffers' dtype)."""
        device = self.cos.device
        if device.type == "meta":
            return
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.base ** (exponent / self.head_dim))
        positions = torch.arange(self.max_position_ids, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``position_ids`` ``(B, S)`` to ``(cos, sin)``, each ``(B, S, head_dim)``."""
        return self.cos[position_ids], self.sin[position_ids]
