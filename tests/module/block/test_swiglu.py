"""SwiGLU MLP: down(silu(gate(x)) * up(x)), bias free."""

import torch
import torch.nn.functional as F

from d9d.module.block.swiglu import SwiGLU


def test_swiglu_formula_and_no_bias():
    mlp = SwiGLU(8, 12)
    assert all(p.dim() == 2 for p in mlp.parameters())
    assert mlp.gate_proj.bias is None and mlp.up_proj.bias is None and mlp.down_proj.bias is None
    x = torch.randn(2, 5, 8)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected)


def test_swiglu_reset_parameters_uses_linear_defaults():
    mlp = SwiGLU(16, 32)
    with torch.no_grad():
        for p in mlp.parameters():
            p.fill_(7.0)
    mlp.reset_parameters()
    assert mlp.gate_proj.weight.abs().max() <= 16**-0.5
    assert mlp.down_proj.weight.abs().max() <= 32**-0.5
    assert mlp.up_proj.weight.std() > 0
