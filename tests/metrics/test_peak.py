"""Peak FLOP/s: datasheet lookup by device name, the CPU measurement, the error path."""

import math

import pytest
import torch

from d9d.metrics import cpu_peak as peak_module
from d9d.metrics.accelerator_peaks import (
    ACCELERATOR_PEAKS,
    UnknownAcceleratorError,
    lookup_accelerator_peak,
)
from d9d.metrics.cpu_peak import faster_dtype_note, measure_cpu_matmul_peak
from d9d.metrics.peak import resolve_peak_flops


@pytest.mark.parametrize(
    ("device_name", "dtype", "tflops", "row"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4, "H100 SXM"),
        ("NVIDIA H100 80GB HBM3", torch.float8_e4m3fn, 1978.9, "H100 SXM"),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5, "H100 PCIe"),
        ("NVIDIA H100 NVL", torch.bfloat16, 835.5, "H100 NVL"),
        ("NVIDIA H200", torch.bfloat16, 989.4, "H200 SXM"),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5, "H200 NVL"),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.4, "GH200"),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0, "A100"),
        ("NVIDIA A100-PCIE-40GB", torch.float32, 19.5, "A100"),
        ("NVIDIA B200", torch.bfloat16, 2250.0, "B200"),
        ("NVIDIA L40S", torch.bfloat16, 362.05, "L40S"),
        ("NVIDIA L4", torch.bfloat16, 121.0, "L4"),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4, "MI300X"),
        ("AMD Instinct MI300X", torch.float8_e4m3fn, 2614.9, "MI300X"),
    ],
)
def test_lookup_by_reported_name(device_name, dtype, tflops, row):
    peak = lookup_accelerator_peak(device_name, dtype)
    assert peak.flops_per_second == pytest.approx(tflops * 1e12)
    assert peak.source.startswith(row + " ")
    assert not peak.measured


def test_every_row_has_a_source_and_a_bf16_peak():
    for row in ACCELERATOR_PEAKS:
        assert "datasheet" in row.source.lower() or "data sheet" in row.source.lower()
        assert row.tflops["bfloat16"] > 0


def test_unknown_accelerator_asks_for_peak_tflops():
    with pytest.raises(UnknownAcceleratorError, match="--peak-tflops") as info:
        lookup_accelerator_peak("NVIDIA GeForce GTX 1080", torch.bfloat16)
    assert "GTX 1080" in str(info.value)


def test_known_accelerator_without_that_dtype_is_an_error_not_a_fallback():
    # A100 has no float8 tensor cores: no number rather than the bf16 one.
    with pytest.raises(UnknownAcceleratorError, match="--peak-tflops"):
        lookup_accelerator_peak("NVIDIA A100-SXM4-80GB", torch.float8_e4m3fn)


def test_unsupported_device_type_is_an_error():
    with pytest.raises(UnknownAcceleratorError, match="--peak-tflops"):
        resolve_peak_flops(torch.device("xpu"), torch.bfloat16)


def test_override_wins_and_is_labelled():
    peak = resolve_peak_flops(torch.device("cpu"), torch.float32, override_tflops=2.5)
    assert peak.flops_per_second == 2.5e12
    assert "--peak-tflops" in peak.source
    assert peak.dtype == "float32"
    with pytest.raises(ValueError, match="positive"):
        resolve_peak_flops(torch.device("cpu"), torch.float32, override_tflops=0.0)


def test_float8_run_is_measured_against_the_peak_of_its_compute_dtype():
    # bf16 on GPUs; a CPU run in fp32 (bf16 emulated there) against the fp32 peak.
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        peak = resolve_peak_flops(torch.device("cpu"), dtype, float8=True, override_tflops=1.0)
        assert peak.dtype == name
        assert f"float8 run: MFU against the {name} peak" in peak.source


def test_cpu_peak_is_measured_in_the_run_dtype():
    flops = measure_cpu_matmul_peak(torch.float32, sizes=(128, 256), repeats=2)
    assert math.isfinite(flops) and flops > 1e8
    # Cached: a second call returns the very same measurement.
    assert measure_cpu_matmul_peak(torch.float32, sizes=(128, 256), repeats=2) == flops
    peak = resolve_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak.measured and peak.dtype == "bfloat16"
    assert peak.source.startswith("measured on this CPU: best bfloat16")


@pytest.mark.parametrize(
    ("device_name", "num_sms", "tflops", "label"),
    [
        # H100 SXM: 132 SMs; a 1g.10gb slice has 16, a 3g.40gb slice 60, 7g.80gb 132.
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16, 989.4 * 16 / 132, "MIG 1g.10gb: 16/132 SMs"),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 989.4 * 60 / 132, "MIG 3g.40gb: 60/132 SMs"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 14, 312.0 * 14 / 108, "MIG 1g.5gb: 14/108 SMs"),
        ("NVIDIA H200 MIG 2g.35gb", 32, 989.4 * 32 / 132, "MIG 2g.35gb: 32/132 SMs"),
    ],
)
def test_mig_slice_gets_its_share_of_the_sms(device_name, num_sms, tflops, label):
    peak = lookup_accelerator_peak(device_name, torch.bfloat16, num_sms=num_sms)
    assert peak.flops_per_second == pytest.approx(tflops * 1e12)
    assert label in peak.source and "scaled by SM count" in peak.source


def test_whole_gpu_with_all_its_sms_is_not_scaled():
    peak = lookup_accelerator_peak("NVIDIA H100 80GB HBM3", torch.bfloat16, num_sms=132)
    assert peak.flops_per_second == pytest.approx(989.4e12)
    assert "scaled" not in peak.source


def test_mig_slice_without_its_sm_count_asks_for_peak_tflops():
    with pytest.raises(UnknownAcceleratorError, match=r"MIG slice \(1g.10gb\).*--peak-tflops"):
        lookup_accelerator_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb", torch.bfloat16)


def test_resolve_reads_the_sm_count_of_the_cuda_device(monkeypatch):
    class _Properties:
        multi_processor_count = 16

    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: _Properties())
    peak = resolve_peak_flops(torch.device("cuda", 0), torch.bfloat16)
    # 989 TFLOP/s would understate this slice's MFU about 8x.
    assert peak.flops_per_second == pytest.approx(989.4e12 * 16 / 132)


@pytest.mark.parametrize(
    ("run_dtype", "bf16_gflops", "fp32_gflops", "expected"),
    [
        # Measured on one of this project's machines (AVX-512 bf16, no AMX).
        (torch.bfloat16, 159.0, 317.0, "--dtype float32 would likely train faster"),
        (torch.float32, 159.0, 317.0, None),
        (torch.float32, 900.0, 317.0, "--dtype bfloat16 would likely train faster"),
        (torch.bfloat16, 300.0, 317.0, None),  # within the margin: no note
    ],
)
def test_note_when_the_other_dtype_multiplies_faster_on_this_cpu(
    monkeypatch, run_dtype, bf16_gflops, fp32_gflops, expected
):
    measured = {torch.bfloat16: bf16_gflops * 1e9, torch.float32: fp32_gflops * 1e9}
    monkeypatch.setattr(peak_module, "measure_cpu_matmul_peak", lambda dtype: measured[dtype])
    note = faster_dtype_note(torch.device("cpu"), run_dtype)
    if expected is None:
        assert note is None
    else:
        assert expected in note
        assert f"{max(measured.values()) / min(measured.values()):.1f}x" in note
    assert faster_dtype_note(torch.device("cuda"), run_dtype) is None


def test_cpu_peak_measurement_stops_before_sizes_past_its_time_budget():
    from d9d.metrics.cpu_peak import largest_measured_size

    sizes = (64, 96, 4096)  # a 4096^3 matmul does not fit a zero budget
    flops = measure_cpu_matmul_peak(torch.float64, sizes=sizes, repeats=1, budget_seconds=0.0)
    assert flops > 0
    assert largest_measured_size(torch.float64, sizes) == 64
    assert largest_measured_size(torch.float16, sizes) is None


@pytest.mark.parametrize(
    ("bf16", "fp32", "chosen"),
    [(159e9, 317e9, torch.float32), (400e9, 420e9, torch.bfloat16), (800e9, 400e9, torch.bfloat16)],
)
def test_auto_dtype_picks_what_this_cpu_multiplies_faster(monkeypatch, bf16, fp32, chosen):
    from d9d.metrics import cpu_peak as peak

    measured = {torch.bfloat16: bf16, torch.float32: fp32}
    monkeypatch.setattr(peak, "measure_cpu_matmul_peak", lambda dtype: measured[dtype])
    dtype, why = peak.faster_cpu_dtype()
    assert dtype == chosen
    assert f"chose {peak.dtype_name(chosen)}" in why and f"{fp32 / 1e12:.3f}" in why
