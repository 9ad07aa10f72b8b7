"""Datasheet peak FLOP/s of accelerators, and the lookup by the name PyTorch reports.

Numbers are **dense** (no 2:4 sparsity) tensor-core peaks from the vendor datasheets, per
GPU. An accelerator missing from the table is an error that asks for an explicit peak: a
guessed peak would make every MFU silently wrong.

A MIG slice reports the whole GPU's name plus its profile ("NVIDIA H100 80GB HBM3 MIG
1g.10gb") but owns only some of its streaming multiprocessors; its peak is the datasheet
peak scaled by its SM count over the full GPU's (tensor-core throughput is per SM).
"""

import re
from dataclasses import dataclass

import torch

# Datasheets (dense figures = the "with sparsity" figure / 2 where only that is printed).
_NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU datasheet (dense = sparsity figure / 2)"
_NVIDIA_H200 = "NVIDIA H200 Tensor Core GPU datasheet (dense = sparsity figure / 2)"
_NVIDIA_GH200 = "NVIDIA GH200 Grace Hopper Superchip datasheet (H100-class GPU, dense)"
_NVIDIA_A100 = "NVIDIA A100 Tensor Core GPU datasheet (dense)"
_NVIDIA_B200 = "NVIDIA HGX B200 / DGX B200 datasheet, per GPU (dense = sparsity figure / 2)"
_NVIDIA_GB200 = "NVIDIA GB200 NVL72 datasheet, per GPU (dense = sparsity figure / 2)"
_NVIDIA_L40S = "NVIDIA L40S datasheet (dense = sparsity figure / 2)"
_NVIDIA_L4 = "NVIDIA L4 datasheet (dense = sparsity figure / 2)"
_AMD_MI300X = "AMD Instinct MI300X data sheet (dense)"
_AMD_MI325X = "AMD Instinct MI325X data sheet (dense)"


@dataclass(frozen=True)
class AcceleratorPeak:
    """Datasheet peaks of one accelerator, in TFLOP/s, dense.

    Attributes:
        name: Product name as printed in reports.
        pattern: Regular expression matched (case-insensitive) against the device name
            that PyTorch reports (``torch.cuda.get_device_name``).
        tflops: Peak per dtype name (``bfloat16``, ``float16``, ``float8``,
            ``float32``); a missing dtype has no published number we trust.
        source: Where the numbers come from.
        num_sms: Streaming multiprocessors (AMD: compute units) of the full device, to
            scale the peak of a MIG slice; ``None`` where not tabulated.
    """

    name: str
    pattern: str
    tflops: dict[str, float]
    source: str
    num_sms: int | None = None


# Order matters: the first pattern that matches wins, so specific names (H100 NVL,
# GH200) come before the generic ones (H100, H200) they contain.
ACCELERATOR_PEAKS: tuple[AcceleratorPeak, ...] = (
    AcceleratorPeak(
        "H100 NVL",
        r"h100\s*nvl",
        {"bfloat16": 835.5, "float16": 835.5, "float8": 1670.5, "float32": 60.0},
        _NVIDIA_H100,
        num_sms=132,
    ),
    AcceleratorPeak(
        "H100 PCIe",
        r"h100\s*pcie",
        {"bfloat16": 756.5, "float16": 756.5, "float8": 1513.0, "float32": 51.0},
        _NVIDIA_H100,
        num_sms=114,
    ),
    # "NVIDIA H100 80GB HBM3" is how the SXM5 part reports itself.
    AcceleratorPeak(
        "H100 SXM",
        r"h100",
        {"bfloat16": 989.4, "float16": 989.4, "float8": 1978.9, "float32": 67.0},
        _NVIDIA_H100,
        num_sms=132,
    ),
    AcceleratorPeak(
        "GH200",
        r"gh200",
        {"bfloat16": 989.4, "float16": 989.4, "float8": 1978.9, "float32": 67.0},
        _NVIDIA_GH200,
        num_sms=132,
    ),
    AcceleratorPeak(
        "H200 NVL",
        r"h200\s*nvl",
        {"bfloat16": 835.5, "float16": 835.5, "float8": 1670.5, "float32": 60.0},
        _NVIDIA_H200,
        num_sms=132,
    ),
    AcceleratorPeak(
        "H200 SXM",
        r"h200",
        {"bfloat16": 989.4, "float16": 989.4, "float8": 1978.9, "float32": 67.0},
        _NVIDIA_H200,
        num_sms=132,
    ),
    # A100 has no float8 tensor cores, so there is deliberately no float8 entry.
    AcceleratorPeak(
        "A100",
        r"a100",
        {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
        _NVIDIA_A100,
        num_sms=108,
    ),
    AcceleratorPeak(
        "GB200",
        r"gb200",
        {"bfloat16": 2500.0, "float16": 2500.0, "float8": 5000.0},
        _NVIDIA_GB200,
    ),
    AcceleratorPeak(
        "B200",
        r"b200",
        {"bfloat16": 2250.0, "float16": 2250.0, "float8": 4500.0},
        _NVIDIA_B200,
        num_sms=148,
    ),
    AcceleratorPeak(
        "L40S",
        r"l40s",
        {"bfloat16": 362.05, "float16": 362.05, "float8": 733.0, "float32": 91.6},
        _NVIDIA_L40S,
        num_sms=142,
    ),
    AcceleratorPeak(
        "L4",
        r"\bl4\b",
        {"bfloat16": 121.0, "float16": 121.0, "float8": 242.5, "float32": 30.3},
        _NVIDIA_L4,
        num_sms=58,
    ),
    AcceleratorPeak(
        "MI325X",
        r"mi325x",
        {"bfloat16": 1307.4, "float16": 1307.4, "float8": 2614.9, "float32": 163.4},
        _AMD_MI325X,
        num_sms=304,
    ),
    AcceleratorPeak(
        "MI300X",
        r"mi300x",
        {"bfloat16": 1307.4, "float16": 1307.4, "float8": 2614.9, "float32": 163.4},
        _AMD_MI300X,
        num_sms=304,
    ),
)

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float8_e4m3fn: "float8",
    torch.float8_e5m2: "float8",
}


class UnknownAcceleratorError(ValueError):
    """No trusted peak is known for this accelerator and dtype; pass one explicitly."""


@dataclass(frozen=True)
class PeakFlops:
    """The peak that MFU is divided by.

    Attributes:
        flops_per_second: Peak FLOP/s.
        dtype: The dtype the peak is for (``bfloat16`` for a float8 run, see
            :func:`resolve_peak_flops`).
        source: Human-readable origin: datasheet row, measurement, or user override.
        measured: True when the number was measured on this machine.
    """

    flops_per_second: float
    dtype: str
    source: str
    measured: bool


def dtype_name(dtype: torch.dtype) -> str:
    """The key used in :data:`ACCELERATOR_PEAKS` for ``dtype``.

    Raises:
        ValueError: For a dtype that has no peak (integer types, float64, ...).
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"no peak FLOP/s is tabulated for dtype {dtype}")
    return _DTYPE_NAMES[dtype]


_MIG_PROFILE = re.compile(r"\bMIG\s+(\d+g\.\d+gb)", flags=re.IGNORECASE)


def lookup_accelerator_peak(
    device_name: str, dtype: torch.dtype, num_sms: int | None = None
) -> PeakFlops:
    """Finds the datasheet peak of an accelerator by the name PyTorch reports.

    Args:
        device_name: E.g. ``"NVIDIA H100 80GB HBM3"``, ``"AMD Instinct MI300X"`` or a MIG
            slice, ``"NVIDIA H100 80GB HBM3 MIG 1g.10gb"``.
        dtype: The matmul dtype.
        num_sms: The SMs this process can use
            (``torch.cuda.get_device_properties(...).multi_processor_count``). Fewer
            than the full device's scale the peak down (a MIG slice); a MIG name
            requires it.

    Returns:
        The peak and its source.

    Raises:
        UnknownAcceleratorError: If no row matches the name, or the matching row has no
            number for ``dtype``, or the name is a MIG slice whose SM share is unknown.
            The message asks for ``--peak-tflops``.
    """
    key = dtype_name(dtype)
    mig = _MIG_PROFILE.search(device_name)
    for row in ACCELERATOR_PEAKS:
        if re.search(row.pattern, device_name, flags=re.IGNORECASE):
            if key not in row.tflops:
                raise UnknownAcceleratorError(
                    f"no {key} peak is tabulated for {row.name} ('{device_name}'); pass "
                    f"--peak-tflops with its dense {key} TFLOP/s"
                )
            tflops = row.tflops[key]
            source = f"{row.name} {key} dense {tflops:g} TFLOP/s ({row.source})"
            if mig is not None and (num_sms is None or row.num_sms is None):
                raise UnknownAcceleratorError(
                    f"'{device_name}' is a MIG slice ({mig.group(1)}) of a {row.name}, whose "
                    "share of the GPU's SMs is unknown here; pass --peak-tflops with the "
                    f"slice's dense {key} TFLOP/s"
                )
            if num_sms is not None and row.num_sms is not None and num_sms < row.num_sms:
                # Tensor-core throughput is per SM: a slice gets its share of the peak.
                what = f"MIG {mig.group(1)}" if mig else "partial device"
                source = (
                    f"{row.name} {what}: {num_sms}/{row.num_sms} SMs of {tflops:g} = "
                    f"{tflops * num_sms / row.num_sms:.1f} TFLOP/s {key} dense ({row.source}, "
                    "scaled by SM count)"
                )
                tflops = tflops * num_sms / row.num_sms
            return PeakFlops(
                flops_per_second=tflops * 1e12,
                dtype=key,
                source=source,
                measured=False,
            )
    raise UnknownAcceleratorError(
        f"unknown accelerator '{device_name}': no peak FLOP/s is tabulated for it; pass "
        f"--peak-tflops with its dense {key} TFLOP/s from the datasheet"
    )
