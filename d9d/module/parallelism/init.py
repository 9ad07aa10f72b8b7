"""Initialisation that does not depend on the layout: same seed, same weights, anywhere.

``reset_parameters()`` on a whole model draws every tensor from one RNG stream, so a
pipeline stage that starts at layer 12 draws different numbers than the one-stage model,
and a sharded parameter (an FSDP2 ``DTensor`` on a CPU mesh) draws each shard from its
rank's own stream. :func:`init_stage_parameters` instead seeds every *unit* (the token
embedding, each layer by its global index, the final norm, the head) from the run's seed
and the unit's name, initialises a full, unsharded copy of the unit, and copies each rank's
part into the real (possibly sharded) parameters. The same seed therefore gives the same
model under one process, FSDP2/HSDP and any pipeline split, which is what makes losses of
different layouts comparable and a checkpoint resumable under another layout.
"""

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from d9d.module.model.qwen3_dense import Qwen3DenseModel


def unit_seed(seed: int, unit_name: str) -> int:
    """A 63-bit seed derived from the run's seed and a unit's name (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{unit_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    backbone: Qwen3DenseModel = module.model if hasattr(module, "model") else module
    prefix = "model." if backbone is not module else ""
    units = []
    if backbone.stage.is_current_stage_first:
        units.append((f"{prefix}embed_tokens", backbone.embed_tokens))
    units.extend((f"{prefix}layers.{i}", layer) for i, layer in backbone.layers.items())
    if backbone.stage.is_current_stage_last:
        units.append((f"{prefix}norm", backbone.norm))
        for head in ("lm_head", "cls_head"):
            if hasattr(module, head) and backbone is not module:
                units.append((head, getattr(module, head)))
    return units


@torch.no_grad()
def init_stage_parameters(module: nn.Module, shadow: nn.Module, seed: int) -> None:
    """Initialises a (possibly FSDP2-sharded) stage module from ``seed``, unit by unit.

    Args:
        module: The stage module, materialised (``to_empty``) and possibly sharded.
        shadow: A plain module of the same class and stage built on ``meta`` (no compile,
            no FSDP2): each unit is materialised there in full, one at a time,
            initialised, copied over, and sent back to ``meta``.
        seed: The run's seed.
    """
    device = next(module.parameters()).device
    shadow_units = dict(_units(shadow))
    for name, unit in _units(module):
        full_unit = shadow_units[name]
        full_unit.to_empty(device=device)
        full_unit.to(next(unit.parameters()).dtype)
        torch.manual_seed(unit_seed(seed, name))
        full_unit.reset_parameters()
        full = dict(full_unit.named_parameters())
        for param_name, param in unit.named_parameters():
            _copy_full_into(param, full[param_name])
        full_unit.to("meta")
    backbone = module.model if hasattr(module, "model") else module
    backbone.rotary_emb.reset_parameters()


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        # Slices this rank's shard out of the full tensor, without communication.
        local = distribute_tensor(
            full, param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
