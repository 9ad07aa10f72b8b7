"""The peak that MFU divides by, with its source: datasheet, measurement or override.

MFU divides achieved model FLOP/s by a peak, so the peak must be stated, with its source,
next to every MFU: accelerators from the datasheet table
(``d9d.metrics.accelerator_peaks``), the CPU measured (``d9d.metrics.cpu_peak``).
"""

import torch

from d9d.metrics.accelerator_peaks import (
    PeakFlops,
    UnknownAcceleratorError,
    dtype_name,
    lookup_accelerator_peak,
)
from d9d.metrics.cpu_peak import largest_measured_size, measure_cpu_matmul_peak


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
