"""Mixed-precision modes become FSDP2 dtypes in the compile config plus a parameter dtype."""

import pytest
import torch

from d9d.compile import CompileConfig
from d9d.train.mixed_precision import apply_mixed_precision


def test_modes():
    base = CompileConfig(name="eager")
    config, dtype = apply_mixed_precision(base, "bf16")
    assert dtype == torch.float32  # fp32 parameters and optimizer state
    assert config.fsdp.torch_param_dtype() == torch.bfloat16  # bf16 compute
    assert config.fsdp.torch_reduce_dtype() == torch.float32  # fp32 gradient reduction
    config, dtype = apply_mixed_precision(base, "fp32")
    assert dtype == torch.float32 and config.fsdp.param_dtype is None
    config, dtype = apply_mixed_precision(base, "pure_bf16")
    assert dtype == torch.bfloat16 and config.fsdp.param_dtype is None
    assert base.fsdp.param_dtype is None, "the preset itself is not modified"


def test_contradicting_preset_and_unknown_mode():
    preset = CompileConfig.model_validate({"name": "p", "fsdp": {"param_dtype": "float16"}})
    with pytest.raises(ValueError, match=r"'p' sets fsdp.param_dtype='float16'.*'bf16'"):
        apply_mixed_precision(preset, "bf16")
    with pytest.raises(ValueError, match="unknown mixed_precision 'fp8'"):
        apply_mixed_precision(CompileConfig(), "fp8")


def test_auto_takes_the_dtype_the_device_multiplies_faster(monkeypatch):
    from d9d.metrics import cpu_peak as peak
    from d9d.train.mixed_precision import resolve_auto_mode

    mode, why = resolve_auto_mode(torch.device("cuda", 0))
    assert mode == "bf16" and "cuda" in why
    for bf16, fp32, expected in ((0.9e12, 0.2e12, "bf16"), (0.001e12, 0.1e12, "fp32")):
        peaks = {torch.bfloat16: bf16, torch.float32: fp32}
        monkeypatch.setattr(peak, "measure_cpu_matmul_peak", lambda dtype, p=peaks: p[dtype])
        mode, why = resolve_auto_mode(torch.device("cpu"))
        assert mode == expected, why
        assert f"bfloat16 {bf16 / 1e12:.3f}, float32 {fp32 / 1e12:.3f} TFLOP/s" in why
