"""Measuring training, for the training loop and the profiling harness alike.

One concern per file: ``flops.py`` (model FLOPs per token), ``peak.py`` (the peak MFU
divides by) with ``accelerator_peaks.py`` (datasheet table) and ``cpu_peak.py`` (measured
CPU GEMM peak, bf16 vs fp32), ``memory.py`` (CUDA statistics, peak RSS, or the CPU
step-memory substitute), ``timers.py`` (a synchronising clock, step times),
``compile_stats.py`` (graph breaks, recompiles) and ``device.py`` (the device's name).
Nothing here imports the harness (``d9d.profiling``).
"""

from d9d.metrics.accelerator_peaks import (
    ACCELERATOR_PEAKS,
    PeakFlops,
    UnknownAcceleratorError,
    lookup_accelerator_peak,
)
from d9d.metrics.compile_stats import CompileStats, read_compile_stats, reset_compile_state
from d9d.metrics.cpu_peak import measure_cpu_matmul_peak
from d9d.metrics.device import device_name
from d9d.metrics.flops import (
    TrainingFlopsPerToken,
    matmul_parameter_count,
    training_flops_per_token,
)
from d9d.metrics.memory import MemoryMeasurement, resident_tensor_bytes
from d9d.metrics.peak import resolve_peak_flops

__all__ = [
    "ACCELERATOR_PEAKS",
    "CompileStats",
    "MemoryMeasurement",
    "PeakFlops",
    "TrainingFlopsPerToken",
    "UnknownAcceleratorError",
    "device_name",
    "lookup_accelerator_peak",
    "matmul_parameter_count",
    "measure_cpu_matmul_peak",
    "read_compile_stats",
    "reset_compile_state",
    "resident_tensor_bytes",
    "resolve_peak_flops",
    "training_flops_per_token",
]
