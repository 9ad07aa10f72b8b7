"""float8 weights all-gathered by FSDP2 in float8 (torchao, tensorwise recipe).

With ``[float8] enable_fsdp_float8_all_gather = true`` the compile layer gives each
float8 linear a weight subclass whose FSDP2 hooks cast the local shard to float8 *before*
the all-gather, halving (vs bf16) the bytes moved. The cast needs the amax of the whole
weight: without help each unit all-reduces it at every all-gather. Calling
:func:`precompute_float8_all_gather_scales` after each optimizer step computes all the
scales in one batched all-reduce instead.
"""

import sys
from collections.abc import Iterable

from torch import nn
from torch.distributed.tensor import DTensor


def uses_float8_all_gather(modules: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether any parameter of ``modules`` is all-gathered in float8 by FSDP2."""
    fsdp_utils = sys.modules.get("torchao.float8.fsdp_utils")
    if fsdp_utils is None:
        # No float8 weight can exist before torchao's float8 support was imported.
        return False
    weight_cls = fsdp_utils.WeightWithDynamicFloat8CastTensor
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for param in module.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if isinstance(local, weight_cls):
                return True
    return False


def precompute_float8_all_gather_scales(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Precomputes the float8 weight scales of FSDP2 modules after an optimizer step.

    A no-op unless some parameter is all-gathered in float8 (a config with
    ``enable_fsdp_float8_all_gather``), so a trainer can call it unconditionally.

    Args:
        modules: This rank's (FSDP2-parallelized) stage module(s).
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not uses_float8_all_gather(modules):
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for module in modules:
        precompute_float8_dynamic_scale_for_fsdp(module)
