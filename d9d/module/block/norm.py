"""Root-mean-square layer normalisation."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 and cast back.

    The weight multiplies the normalised value after the cast, as in HF Qwen3, so bf16
    results match it bit for bit.

    Args:
        dim: Size of the normalised (last) dimension.
        eps: Added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises ``x`` over its last dimension."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        """Sets the weight to ones."""
        nn.init.ones_(self.weight)
