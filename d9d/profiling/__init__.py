"""The profiling harness: the measured benchmark runner, its reports and the GPU smoke run.

``benchmark.py`` (the measured training loop), ``distributed.py`` (the same under
``torchrun``), ``packed.py`` (packed vs padded documents), ``report.py`` (records and the
table), ``support.py`` (which presets a device can run) and ``smoke.py`` (the GPU smoke
run's summary). ``profiling/mfu.py`` is the CLI. What they measure with (FLOPs, peaks,
memory, timers, compile counters) lives in ``d9d.metrics``, which the training loop uses
too; nothing outside the harness imports this package.
"""

from d9d.profiling.report import ProfileRecord, format_table

__all__ = ["ProfileRecord", "format_table"]
