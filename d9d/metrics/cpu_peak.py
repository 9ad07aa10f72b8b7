"""The CPU's matmul peak, measured, and which of bf16 / fp32 it multiplies faster.

A CPU has no datasheet number that PyTorch reaches, so its peak is measured: the best
FLOP/s of a few large square matmuls in the run's dtype on the run's threads. CPUs differ
a lot in bf16: without bf16 matmul units (AVX2 only) bf16 is emulated and many times
slower than fp32; with AVX-512-BF16 it is about half fp32's speed or better; with AMX it
is several times faster. The dtype advice below compares the two measured peaks.
"""

import time

import torch

from d9d.metrics.accelerator_peaks import dtype_name

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
