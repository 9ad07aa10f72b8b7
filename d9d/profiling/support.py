"""Whether this machine can run a compile preset at all, asked before anything is built.

A preset that cannot run here (float8 without torchao, the ``memory_budget`` checkpoint
mode on a torch without the API; a device without float8 GEMMs runs float8 emulated, so
it is no reason) is shown by the harness
as a ``skipped`` row with the reason, instead of raising after the configs before it
have run and losing their rows.
"""

import torch

from d9d.compile.config import CompileConfig
from d9d.compile.float8 import float8_unsupported_reason


def unsupported_reason(config: CompileConfig, device: torch.device) -> str | None:
    """Why ``config`` cannot run on ``device`` with this installation (``None``: it can).

    Args:
        config: The compile preset.
        device: The device the run trains on.
    """
    if config.activation_checkpointing.mode == "memory_budget" and not hasattr(
        torch.autograd.graph, "region_activation_memory_budget"
    ):
        return (
            "activation_checkpointing.mode='memory_budget' needs torch >= 2.13 "
            f"(torch.autograd.graph.region_activation_memory_budget); this is torch "
            f"{torch.__version__}"
        )
    if config.float8.enabled:
        return float8_unsupported_reason(device)
    return None
