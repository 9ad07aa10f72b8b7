"""float8 where the device has no float8 GEMM: decided by capability, GEMMs in bf16/fp32.

The emulated linear must keep the recipe's numerics (torchao's casts and scales), never
reach ``torch._scaled_mm`` (a slow fallback on CPUs) and multiply in the compute dtype.
"""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from d9d.compile import float8 as float8_module
from d9d.compile.config import Float8Section
from d9d.compile.float8 import (
    EMULATED_GEMMS,
    convert_linears_to_float8,
    has_float8_gemm,
    import_torchao_float8,
)

import_torchao_float8()
from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from d9d.compile.float8_emulated import EmulatedFloat8Linear  # noqa: E402


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.calls.append((str(func.overloadpacket), dtypes))
        return func(*args, **(kwargs or {}))


def _linear(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, bias=False)).to(dtype)


def _run(model: nn.Module, dtype: torch.dtype, values: torch.dtype | None = None):
    # ``values``: round the input and output gradient to this dtype first (same values
    # for runs in different dtypes).
    values = values or dtype
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    x = x.to(values).to(dtype).requires_grad_(True)
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad.to(values).to(dtype))
    return out.detach(), x.grad, model[0].weight.grad


def test_capability_decides_not_the_product_name(monkeypatch):
    assert not has_float8_gemm(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, native in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert has_float8_gemm(torch.device("cuda", 0)) is native, capability


def test_rocm_is_measured_once_per_device(monkeypatch):
    # ROCm's capability numbers are gfx versions: only the kernel itself can tell.
    calls = []

    def measured(device):
        calls.append(device)
        return True

    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(float8_module, "measure_float8_gemm_is_fast", measured)
    assert has_float8_gemm(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_measurement_runs_on_this_device():
    # The measurement itself (its verdict is a timing: not asserted, only that it runs and
    # is cached).
    device = torch.device("cpu")
    first = float8_module.measure_float8_gemm_is_fast(device)
    assert isinstance(first, bool)
    assert float8_module._measured_float8_gemm_is_fast.cache_info().currsize >= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemms_run_in_the_compute_dtype_never_in_scaled_mm(dtype):
    model = _linear(dtype)
    report = convert_linears_to_float8(model, Float8Section(enabled=True))
    assert report.emulated and report.gemms == EMULATED_GEMMS
    assert type(model[0]) is EmulatedFloat8Linear and isinstance(model[0], Float8Linear)
    with _RecordOps() as ops:
        _run(model, dtype)
    names = [name for name, _ in ops.calls]
    assert "aten._scaled_mm" not in names
    mms = [dtypes for name, dtypes in ops.calls if name == "aten.mm"]
    assert len(mms) == 3  # output, grad_input, grad_weight
    assert all(dtypes == (dtype, dtype) for dtypes in mms), mms
    # ... of operands that went through float8 (the recipe's casts).
    assert any(torch.float8_e4m3fn in dtypes for _, dtypes in ops.calls)
    assert any(torch.float8_e5m2 in dtypes for _, dtypes in ops.calls)  # output gradient


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numerics_are_torchao_float8(recipe, dtype):
    """Against torchao's own emulation (fp32 GEMMs on the same float8 operands).

    Both multiply the same float8 values exactly (products of 4-bit mantissas are exact
    in bf16 and fp32, sums accumulate in fp32); they differ only in where the scales are
    applied. Rowwise scales are powers of two, so dividing by them is exact and both
    agree bit for bit. Tensorwise: the scale divides the inputs (torchao) or the output
    (here), so each of the K <= 96 summed terms may differ by an ulp: in fp32 at most
    96 * 2^-24 ~ 6e-6 of the largest term, bounded here by 1e-5 of the largest output;
    in bf16 the GEMM's bf16 output is rounded once more before the scale: 2 bf16 ulps,
    2^-7 of the largest output.
    """
    reference = _linear(dtype)
    ours = copy.deepcopy(reference)
    convert_linears_to_float8(ours, Float8Section(enabled=True, recipe=recipe))
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    convert_to_float8_training(reference, config=config)
    bounds = {"rowwise": 0.0, torch.float32: 1e-5, torch.bfloat16: 2**-7}
    bound = bounds["rowwise"] if recipe == "rowwise" else bounds[dtype]
    for actual, expected in zip(_run(ours, dtype), _run(reference, dtype), strict=True):
        error = (actual.float() - expected.float()).abs().max()
        assert error <= bound * expected.float().abs().max(), (error, expected.abs().max())


def test_float16_multiplies_in_float32():
    # A product of two e4m3 values reaches 448^2, past fp16's range: fp16 multiplies in
    # fp32. On the same (fp16-representable) values the casts, scales and fp32 GEMMs are
    # those of an fp32 run, so fp16 gives the fp32 results rounded once to fp16.
    model = _linear(torch.float16)
    convert_linears_to_float8(model, Float8Section(enabled=True))
    fp32 = copy.deepcopy(model).float()
    half = _run(model, torch.float16)
    full = _run(fp32, torch.float32, values=torch.float16)
    for actual, expected in zip(half, full, strict=True):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected.to(torch.float16), rtol=0, atol=0)
