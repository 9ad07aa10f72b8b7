"""Measuring training: model FLOPs, peak FLOP/s, memory, step timers, compile counters.

One concern per file: ``flops.py`` (FLOPs per token), ``peak.py`` (datasheet table and
measured CPU peak), ``memory.py`` (CUDA statistics or the CPU substitute), ``timers.py``,
``compile_stats.py`` (graph breaks, recompiles), ``model_presets.py`` (named shapes),
``benchmark.py`` (the measured training loop), ``distributed.py`` (the same under
``torchrun``) and ``report.py`` (records and the table). ``profiling/mfu.py`` is the CLI.
"""

from d9d.profiling.compile_stats import CompileStats, read_compile_stats, reset_compile_state
from d9d.profiling.flops import (
    TrainingFlopsPerToken,
    matmul_parameter_count,
    training_flops_per_token,
)
from d9d.profiling.memory import MemoryMeasurement, resident_tensor_bytes
from d9d.profiling.model_presets import MODEL_PRESETS, ModelPreset, get_model_preset
from d9d.profiling.peak import (
    ACCELERATOR_PEAKS,
    PeakFlops,
    UnknownAcceleratorError,
    lookup_accelerator_peak,
    measure_cpu_matmul_peak,
    resolve_peak_flops,
)
from d9d.profiling.report import ProfileRecord, format_table

__all__ = [
    "ACCELERATOR_PEAKS",
    "MODEL_PRESETS",
    "CompileStats",
    "MemoryMeasurement",
    "ModelPreset",
    "PeakFlops",
    "ProfileRecord",
    "TrainingFlopsPerToken",
    "UnknownAcceleratorError",
    "format_table",
    "get_model_preset",
    "lookup_accelerator_peak",
    "matmul_parameter_count",
    "measure_cpu_matmul_peak",
    "read_compile_stats",
    "reset_compile_state",
    "resident_tensor_bytes",
    "resolve_peak_flops",
    "training_flops_per_token",
]
