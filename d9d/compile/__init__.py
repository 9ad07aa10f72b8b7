"""The compile layer: float8, activation checkpointing and regional ``torch.compile``.

One file per technique: ``config.py`` (the preset schema and loader), ``float8.py``,
``activation_checkpointing.py``, ``regional.py``, and ``apply.py`` (each step as a
function, and the whole preset in its order).
"""

from d9d.compile.apply import (
    CompileReport,
    apply_checkpointing,
    apply_compile,
    apply_compile_config,
    apply_float8,
    prepare_compile_config,
)
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
    "apply_checkpointing",
    "apply_compile",
    "apply_compile_config",
    "apply_float8",
    "list_presets",
    "load_compile_config",
    "prepare_compile_config",
]
