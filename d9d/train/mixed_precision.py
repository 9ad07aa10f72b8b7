"""Mixed precision as large runs do it, expressed as a compile config plus a parameter dtype.

* ``"bf16"``: fp32 parameters and optimizer state, bf16 compute, fp32 gradient reduction.
  FSDP2's ``MixedPrecisionPolicy`` casts the all-gathered parameters to bf16 for forward
  and backward and reduces gradients in fp32 into the fp32 shards; the training stack
  applies FSDP2 on a world of one too, so a single process gets the same numerics.
* ``"fp32"``: everything in fp32 (the numerical reference).
* ``"pure_bf16"``: parameters, gradients and optimizer state in bf16: half the memory,
  less accurate updates (small updates round away).
"""

from typing import Literal

import torch

from d9d.compile import CompileConfig

MixedPrecisionMode = Literal["bf16", "fp32", "pure_bf16"]


def apply_mixed_precision(
    compile_config: CompileConfig, mode: MixedPrecisionMode
) -> tuple[CompileConfig, torch.dtype]:
    """Folds a mixed-precision mode into a compile config.

    Args:
        compile_config: The compile preset (its ``[fsdp]`` dtypes must be unset, or agree).
        mode: ``"bf16"``, ``"fp32"`` or ``"pure_bf16"``.

    Returns:
        The compile config with the FSDP2 dtypes of ``mode``, and the dtype parameters
        (and so optimizer state) are stored in.

    Raises:
        ValueError: For an unknown mode, or a preset whose ``[fsdp]`` dtypes contradict it.
    """
    fsdp = compile_config.fsdp
    if mode == "bf16":
        wanted = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
        param_dtype = torch.float32
    elif mode in ("fp32", "pure_bf16"):
        wanted = {"param_dtype": None, "reduce_dtype": None}
        param_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    else:
        raise ValueError(f"unknown mixed_precision {mode!r}; use 'bf16', 'fp32' or 'pure_bf16'")
    for key, value in wanted.items():
        preset = getattr(fsdp, key)
        if preset is not None and preset != value:
            raise ValueError(
                f"compile preset {compile_config.name!r} sets fsdp.{key}={preset!r}, which "
                f"contradicts mixed_precision={mode!r}"
            )
    update = {k: v for k, v in wanted.items() if v is not None}
    config = compile_config.model_copy(update={"fsdp": fsdp.model_copy(update=update)})
    return config, param_dtype
