"""float8 weights all-gathered by FSDP2 in float8 (torchao, tensorwise recipe).

With ``[float8] enable_fsdp_float8_all_gather = true`` the compile layer gives each
float8 linear a weight subclass whose FSDP2 hooks cast the local shard to float8 *before*
the all-gather, halving (vs bf16) the bytes moved. The cast needs the amax of the whole
weight: without help each unit all-reduces it at every all-gather. Calling
:func:`precompute_float8_all_gather_scales` after each optimizer step computes all the
scales in one batched all-reduce instead.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from d9d.compile import CompileConfig


def precompute_float8_all_gather_scales(
    modules: nn.Module | Iterable[nn.Module], compile_config: "CompileConfig | None"
) -> None:
    """Precomputes the float8 weight scales of FSDP2 modules after an optimizer step.

    A no-op unless ``compile_config`` enables float8 with
    ``enable_fsdp_float8_all_gather``, so a trainer can call it unconditionally.

    Args:
        modules: This rank's (FSDP2-parallelized) stage module(s).
        compile_config: The config the modules were built with.
    """
    if compile_config is None:
        return
    section = compile_config.float8
    if not (section.enabled and section.enable_fsdp_float8_all_gather):
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for module in [modules] if isinstance(modules, nn.Module) else modules:
        precompute_float8_dynamic_scale_for_fsdp(module)
