"""Peak FLOP/s: a datasheet table for accelerators, a measured GEMM peak for the CPU.

MFU divides achieved model FLOP/s by a peak, so the peak must be stated, with its source,
next to every MFU. Accelerator numbers are **dense** (no 2:4 sparsity) tensor-core peaks
from the vendor datasheets, per GPU. A CPU has no datasheet number that PyTorch reaches,
so its peak is measured here: the best FLOP/s of a few large square matmuls in the run's
dtype on the run's threads. An accelerator missing from the table is an error that asks
for an explicit peak: a guessed peak would make every MFU silently wrong.

A MIG slice reports the whole GPU's name plus its profile ("NVIDIA H100 80GB HBM3 MIG
1g.10gb") but owns only some of its streaming multiprocessors; its peak is the datasheet
peak scaled by its SM count over the full GPU's (tensor-core throughput is per SM).
"""

import re
import time
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


_CPU_PEAK_CACHE: dict[tuple[torch.dtype, tuple[int, ...], int], tuple[float, int]] = {}


def measure_cpu_matmul_peak(
    dtype: torch.dtype,
    sizes: tuple[int, ...] = (512, 1024, 2048),
    repeats: int = 3,
    budget_seconds: float = 20.0,
) -> float:
    """Measures the CPU's matmul peak in ``dtype``: best FLOP/s of square GEMMs.

    Each size runs once untimed (to warm the kernel and the caches) and then ``repeats``
    timed times; the best single run over all sizes is the peak. "Best" rather than
    median because the question is what the BLAS *can* reach on these threads; noise
    from other processes only ever lowers a sample. The result is cached per dtype,
    sizes and thread count for the life of the process.

    A size whose projected cost (cubic in the side, from the previous size's timing)
    would take the measurement past ``budget_seconds`` is left out: on a CPU without
    fast bf16 kernels one 2048^3 bf16 matmul takes about a minute, and the smaller sizes
    already show what the kernel reaches. :func:`largest_measured_size` tells how far
    it went.

    Args:
        dtype: The matmul dtype (the run's dtype).
        sizes: Side lengths of the square matrices, ascending.
        repeats: Timed runs per size.
        budget_seconds: Time the measurement may take (the first size always runs).

    Returns:
        Peak FLOP/s.
    """
    key = (dtype, tuple(sizes), torch.get_num_threads())
    if key in _CPU_PEAK_CACHE:
        return _CPU_PEAK_CACHE[key][0]
    best = 0.0
    largest = sizes[0]
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    previous: tuple[int, float] | None = None
    for size in sizes:
        if previous is not None:
            prev_size, prev_seconds = previous
            projected = prev_seconds * (size / prev_size) ** 3 * (repeats + 1)
            if time.perf_counter() - started + projected > budget_seconds:
                break
        largest = size
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        torch.mm(a, b)
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * size**3 / fastest)
        previous = (size, fastest)
    _CPU_PEAK_CACHE[key] = (best, largest)
    return best


def largest_measured_size(
    dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048)
) -> int | None:
    """The largest matmul side :func:`measure_cpu_matmul_peak` reached (``None``: not run)."""
    cached = _CPU_PEAK_CACHE.get((dtype, tuple(sizes), torch.get_num_threads()))
    return None if cached is None else cached[1]


def resolve_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    *,
    float8: bool = False,
    override_tflops: float | None = None,
) -> PeakFlops:
    """The peak to divide by for a run on ``device`` in ``dtype``.

    * ``override_tflops`` wins (the ``--peak-tflops`` flag), labelled as such.
    * A float8 run is measured against the peak of the dtype it otherwise computes in
      (bf16 on GPUs): float8 speeds up the same model FLOPs, so MFU against that peak
      shows the gain, while MFU against the (twice as high) fp8 peak would punish the
      casts float8 training needs. On a CPU that trains in fp32 (bf16 emulated), that
      is the fp32 peak: a bf16 peak there is a slow emulation, not a ceiling. The
      source says so.
    * CPU: :func:`measure_cpu_matmul_peak` (labelled "measured").
    * CUDA / ROCm: :func:`lookup_accelerator_peak` by device name.

    Args:
        device: The device of the run.
        dtype: The run's parameter/compute dtype.
        float8: Whether float8 linears are enabled.
        override_tflops: An explicit peak in TFLOP/s.

    Returns:
        The peak, with its source.

    Raises:
        UnknownAcceleratorError: For an accelerator (or device type) with no tabulated
            peak and no override.
        ValueError: For a non-positive override.
    """
    peak_dtype = dtype
    basis = f" (float8 run: MFU against the {dtype_name(dtype)} peak)" if float8 else ""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override_tflops}")
        return PeakFlops(
            flops_per_second=override_tflops * 1e12,
            dtype=dtype_name(peak_dtype),
            source=f"--peak-tflops {override_tflops:g} (given by the user){basis}",
            measured=False,
        )
    if device.type == "cpu":
        flops = measure_cpu_matmul_peak(peak_dtype)
        return PeakFlops(
            flops_per_second=flops,
            dtype=dtype_name(peak_dtype),
            source=(
                f"measured on this CPU: best {dtype_name(peak_dtype)} square matmul "
                f"(512-{largest_measured_size(peak_dtype)}) on {torch.get_num_threads()} threads, "
                f"{flops / 1e12:.3f} TFLOP/s{basis}"
            ),
            measured=True,
        )
    if device.type == "cuda":
        peak = lookup_accelerator_peak(
            torch.cuda.get_device_name(device),
            peak_dtype,
            num_sms=torch.cuda.get_device_properties(device).multi_processor_count,
        )
        return PeakFlops(
            flops_per_second=peak.flops_per_second,
            dtype=peak.dtype,
            source=peak.source + basis,
            measured=False,
        )
    raise UnknownAcceleratorError(
        f"no peak FLOP/s is known for device type '{device.type}'; pass --peak-tflops"
    )


def faster_cpu_dtype(margin: float = 1.2) -> tuple[torch.dtype, str]:
    """The dtype a CPU trains faster in: fp32 if its GEMM peak beats bf16's by ``margin``.

    CPUs without bf16 matmul units (AVX2 only, or AVX-512 without bf16/AMX) emulate bf16
    and run it several times slower than fp32; CPUs with them (AMX, AVX-512-BF16) are
    about as fast or faster in bf16, which then also halves the memory.

    Returns:
        The dtype and a line saying why (both measured peaks).
    """
    bf16 = measure_cpu_matmul_peak(torch.bfloat16)
    fp32 = measure_cpu_matmul_peak(torch.float32)
    chosen = torch.float32 if fp32 > margin * bf16 else torch.bfloat16
    return chosen, (
        f"--dtype auto chose {dtype_name(chosen)} on this CPU (measured matmul peaks: "
        f"bfloat16 {bf16 / 1e12:.3f}, float32 {fp32 / 1e12:.3f} TFLOP/s)"
    )


def faster_dtype_note(
    device: torch.device, dtype: torch.dtype, *, margin: float = 1.2
) -> str | None:
    """A warning when this CPU multiplies faster in the other of bf16 / fp32.

    Some CPUs (AVX-512 with bf16 instructions but no AMX) run bf16 GEMMs at half their
    fp32 speed: a bf16 run then reports a high MFU against its low bf16 peak while fp32
    would train about twice as fast. Both peaks are measured (cached, a few seconds).

    Args:
        device: The device of the run (only the CPU is measured).
        dtype: The run's dtype.
        margin: How much faster the other dtype must be to say so.

    Returns:
        One line for under the table, or ``None``.
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return None
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    run_peak = measure_cpu_matmul_peak(dtype)
    other_peak = measure_cpu_matmul_peak(other)
    if other_peak <= margin * run_peak:
        return None
    return (
        f"note: this CPU's measured {dtype_name(other)} matmul peak "
        f"({other_peak / 1e12:.3f} TFLOP/s) is {other_peak / run_peak:.1f}x its "
        f"{dtype_name(dtype)} peak ({run_peak / 1e12:.3f} TFLOP/s): --dtype "
        f"{dtype_name(other)} would likely train faster; the MFU above is against the "
        f"{dtype_name(dtype)} peak"
    )
