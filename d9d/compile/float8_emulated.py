"""float8 training where the device has no float8 GEMM: the recipe's casts, GEMMs in bf16.

A float8 linear casts its input, weight and output gradient to float8 with dynamic
scales, then multiplies the float8 operands (``torch._scaled_mm``). Where the device has
no float8 GEMM (every CPU on torch 2.13, CUDA below compute capability 8.9), that
multiply falls back to a reference kernel: measured 0.06 GFLOP/s on an Intel Xeon with
AMX, against 1.5 TFLOP/s for its bf16 GEMM, so one step of a small model took minutes.
torchao's own ``emulate=True`` multiplies in fp32, which is 4-8x slower than bf16 on
CPUs with bf16 matmul units.

:class:`EmulatedFloat8Linear` keeps everything of torchao's ``Float8Linear`` (the module,
its config, its FSDP2 float8 weight wrapper, its parameter names) and replaces only the
matmul: the operands are cast exactly as the recipe casts them (torchao's own scale and
saturating-cast functions, the same per-tensor or per-row axes in forward and backward),
and the float8 values, which bf16 and fp32 represent exactly, are multiplied in the
compute dtype; the product is then divided by both scales in fp32, where
``torch._scaled_mm`` would apply them. The numerics are those of float8 training (the
rounding of every operand to float8) up to the rounding of the GEMM's output; the speed
is that of a bf16 GEMM plus the elementwise casts.
"""

import torch
from torch import nn

from d9d.compile.float8 import import_torchao_float8

import_torchao_float8()

from torchao.float8.config import (  # noqa: E402 (after the quiet import above)
    CastConfig,
    Float8LinearConfig,
    ScalingGranularity,
    ScalingType,
)
from torchao.float8.distributed_utils import tensor_already_casted_to_fp8  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated  # noqa: E402

# An operand of an emulated float8 GEMM: its float8 values and the scale they were
# multiplied by (``None``: left in high precision by the recipe).
_Operand = tuple[torch.Tensor, torch.Tensor | None]


def _cast(hp: torch.Tensor, cast: CastConfig, axis: int, config: Float8LinearConfig) -> _Operand:
    """The recipe's dynamic cast of ``hp`` (per tensor, or per slice along ``axis``)."""
    if tensor_already_casted_to_fp8(hp):
        # A weight FSDP2 all-gathered in float8 arrives cast (tensorwise scale).
        return hp._data, hp._scale
    if cast.scaling_type is ScalingType.DISABLED:
        return hp, None
    axiswise = cast.scaling_granularity is ScalingGranularity.AXISWISE
    scale = tensor_to_scale(
        hp,
        cast.target_dtype,
        scaling_granularity=cast.scaling_granularity,
        axiswise_dim=axis if axiswise else None,
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
    )
    # The same arithmetic as torchao's cast to a float8 tensor: fp32 multiply, saturate.
    return to_fp8_saturated(hp.to(torch.float32) * scale, cast.target_dtype), scale


def _t(operand: _Operand) -> _Operand:
    data, scale = operand
    return data.t(), None if scale is None else scale.t()


def _gemm(a: _Operand, b: _Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of two cast operands, multiplied in the compute dtype, scales applied."""
    (a_data, a_scale), (b_data, b_scale) = a, b
    # float8 values are exact in bf16 and fp32; in fp16 a product of two e4m3 values
    # (up to 448^2) would overflow, so fp16 runs multiply in fp32.
    gemm_dtype = torch.float32 if out_dtype == torch.float16 else out_dtype
    out = torch.mm(a_data.to(gemm_dtype), b_data.to(gemm_dtype))
    if a_scale is None and b_scale is None:
        return out.to(out_dtype)
    out = out.to(torch.float32)
    # Per-row scales broadcast: (M, 1) for the left operand, (1, N) for the right.
    if a_scale is not None:
        out = out / a_scale
    if b_scale is not None:
        out = out / b_scale
    return out.to(out_dtype)


@torch._dynamo.allow_in_graph
class _EmulatedFloat8Matmul(torch.autograd.Function):
    """``input @ weight_t`` with float8 operands, GEMMs in the compute dtype.

    The casts mirror torchao's float8 matmul: forward casts the input per row (axis -1)
    and the weight per output column (axis 0); backward casts the output gradient per
    row for the input gradient and per column for the weight gradient, and the input
    per column for the weight gradient. Like torchao, the high-precision input and
    weight are saved and cast again in backward.
    """

    @staticmethod
    def forward(ctx, input_hp, weight_hp_t, config: Float8LinearConfig):
        ctx.save_for_backward(input_hp, weight_hp_t)
        ctx.config = config
        shape = input_hp.shape
        x = input_hp.reshape(-1, shape[-1])
        out = _gemm(
            _cast(x, config.cast_config_input, -1, config),
            _cast(weight_hp_t, config.cast_config_weight, 0, config),
            input_hp.dtype,
        )
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        input_hp, weight_hp_t = ctx.saved_tensors
        config = ctx.config
        shape = grad_output.shape
        grad = grad_output.reshape(-1, shape[-1])
        x = input_hp.reshape(-1, input_hp.shape[-1])
        grad_input = _gemm(
            _cast(grad, config.cast_config_grad_output, -1, config),
            _t(_cast(weight_hp_t, config.cast_config_weight_for_grad_input, -1, config)),
            grad_output.dtype,
        )
        grad_weight = _gemm(
            _t(_cast(grad, config.cast_config_grad_output_for_grad_weight, 0, config)),
            _cast(x, config.cast_config_input_for_grad_weight, 0, config),
            grad_output.dtype,
        )
        return grad_input.reshape(*shape[:-1], grad_input.shape[-1]), grad_weight.t(), None


class EmulatedFloat8Linear(Float8Linear):
    """torchao's ``Float8Linear`` with its GEMMs emulated in the compute dtype.

    Never constructed directly: :func:`emulate_float8_gemms` switches the class of
    converted linears in place, so their parameters, names and FSDP2 weight wrapper stay.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """float8-cast ``input`` and weight, multiplied in ``input``'s dtype."""
        output = _EmulatedFloat8Matmul.apply(input, self.weight.t(), self.config)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output


def emulate_float8_gemms(model: nn.Module) -> list[str]:
    """Switches every torchao ``Float8Linear`` of ``model`` to emulated GEMMs, in place.

    Args:
        model: A model whose linears ``convert_to_float8_training`` converted.

    Returns:
        The FQNs of the switched linears.
    """
    switched = []
    for fqn, module in model.named_modules():
        if type(module) is Float8Linear:
            module.__class__ = EmulatedFloat8Linear
            switched.append(fqn)
    return switched
