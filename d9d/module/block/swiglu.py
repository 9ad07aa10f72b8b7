"""SwiGLU feed-forward block."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with bias-free projections.

    Args:
        hidden_size: Input and output size.
        intermediate_size: Size of the gated hidden layer.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the gated MLP."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self) -> None:
        """Re-initialises the projections with PyTorch's ``nn.Linear`` defaults."""
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            proj.reset_parameters()
