"""What "mixed precision" means, decided in one place for the loop and the harness.

A precision is a compile config (whose ``[fsdp]`` section carries FSDP2's
``MixedPrecisionPolicy`` dtypes) plus the dtype parameters and optimizer state are
stored in:

* mixed (``"bf16"``): fp32 parameters and optimizer state, compute in the compute dtype
  (bf16), fp32 gradient reduction. FSDP2 casts the all-gathered parameters for forward
  and backward and reduces gradients in fp32 into the fp32 shards; the training stack
  applies FSDP2 on a world of one too, so a single process gets the same numerics.
* ``"fp32"``: everything in fp32 (the numerical reference).
* pure (``"pure_bf16"``): parameters, gradients and optimizer state in the compute dtype:
  half the memory, less accurate updates (small updates round away).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from d9d.compile import CompileConfig

MixedPrecisionMode = Literal["bf16", "fp32", "pure_bf16"]


@dataclass(frozen=True)
class Precision:
    """A resolved precision.

    Attributes:
        compile_config: The compile preset with the FSDP2 dtypes of the precision.
        param_dtype: The dtype parameters (and so optimizer state) are stored in.
        label: One line for reports and logs.
    """

    compile_config: CompileConfig
    param_dtype: torch.dtype
    label: str


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_precision(
    compile_config: CompileConfig | None, compute_dtype: torch.dtype, *, mixed: bool
) -> Precision:
    """The precision of a run that computes in ``compute_dtype``.

    Args:
        compile_config: The compile preset (``None``: eager).
        compute_dtype: The dtype of the matmuls.
        mixed: fp32 parameters and optimizer state with fp32 gradient reduction (has no
            effect when ``compute_dtype`` is fp32). ``False``: everything in
            ``compute_dtype``, unless the preset's own ``[fsdp]`` section casts.

    Returns:
        The compile config with the FSDP2 dtypes, the parameter dtype and a label.

    Raises:
        ValueError: If the preset's ``[fsdp]`` dtypes contradict mixed precision.
    """
    config = compile_config or CompileConfig(name="eager")
    compute = _name(compute_dtype)
    fsdp = config.fsdp
    if mixed and compute_dtype != torch.float32:
        wanted = {"param_dtype": compute, "reduce_dtype": "float32"}
        for key, value in wanted.items():
            preset = getattr(fsdp, key)
            if preset is not None and preset != value:
                raise ValueError(
                    f"compile preset {config.name!r} sets fsdp.{key}={preset!r}, which "
                    f"contradicts mixed precision ({key} {value!r})"
                )
        config = config.model_copy(update={"fsdp": fsdp.model_copy(update=wanted)})
        label = f"mixed: float32 parameters and optimizer, {compute} compute, float32 reduce"
        return Precision(config, torch.float32, label)
    if fsdp.is_mixed_precision:  # the preset itself asks for casting
        cast = fsdp.param_dtype or compute
        reduce = fsdp.reduce_dtype or compute
        label = f"mixed (preset): {compute} parameters, {cast} compute, {reduce} reduce"
        return Precision(config, compute_dtype, label)
    return Precision(config, compute_dtype, f"pure {compute}: parameters, optimizer and compute")


def apply_mixed_precision(
    compile_config: CompileConfig, mode: MixedPrecisionMode
) -> tuple[CompileConfig, torch.dtype]:
    """Folds a training config's ``mixed_precision`` mode into a compile config.

    Args:
        compile_config: The compile preset (its ``[fsdp]`` dtypes must be unset, or agree).
        mode: ``"bf16"``, ``"fp32"`` or ``"pure_bf16"``.

    Returns:
        The compile config with the FSDP2 dtypes of ``mode``, and the dtype parameters
        (and so optimizer state) are stored in.

    Raises:
        ValueError: For an unknown mode, or a preset whose ``[fsdp]`` dtypes contradict it.
    """
    if mode not in ("bf16", "fp32", "pure_bf16"):
        raise ValueError(f"unknown mixed_precision {mode!r}; use 'bf16', 'fp32' or 'pure_bf16'")
    wanted = {"param_dtype": "bfloat16", "reduce_dtype": "float32"} if mode == "bf16" else {}
    for key in ("param_dtype", "reduce_dtype"):
        preset = getattr(compile_config.fsdp, key)
        if preset is not None and preset != wanted.get(key):
            raise ValueError(
                f"compile preset {compile_config.name!r} sets fsdp.{key}={preset!r}, which "
                f"contradicts mixed_precision={mode!r}"
            )
    compute = torch.float32 if mode == "fp32" else torch.bfloat16
    precision = resolve_precision(compile_config, compute, mixed=mode == "bf16")
    return precision.compile_config, precision.param_dtype
