"""The compile layer: float8, activation checkpointing and regional ``torch.compile``.

One file per technique: ``config.py`` (the preset schema and loader), ``float8.py``,
``activation_checkpointing.py``, ``regional.py``, and ``apply.py`` (the order).
"""

from d9d.compile.apply import CompileReport, apply_compile_config, get_compile_report
from d9d.compile.config import (
    PRESET_DIR,
    CompileConfig,
    list_presets,
    load_compile_config,
)

__all__ = [
    "PRESET_DIR",
    "CompileConfig",
    "CompileReport",
    "apply_compile_config",
    "get_compile_report",
    "list_presets",
    "load_compile_config",
]
