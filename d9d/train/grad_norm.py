"""Gradient clipping by the global norm over FSDP/HSDP shards and pipeline ranks.

A rank holds shards of the parameters of its pipeline stages. The norm must be the one a
single device would compute over *every* parameter of the model, so:

1. each local gradient contributes the ``p``-th power of the norm of its local shard
   (computed in fp32 whatever the gradient dtype);
2. for ``DTensor`` gradients (FSDP2/HSDP, tensor parallelism, both), those sums are
   all-reduced over every mesh dim whose placement is not ``Replicate`` (see
   :func:`reduction_dims`): replicated dims hold copies and must not be counted twice,
   any other placement holds a different piece of the gradient on each rank;
3. the sums of this rank's stages are all-reduced over the pipeline group.

The infinity norm uses the maximum instead of sums. Gradients are then scaled by
``max_norm / (norm + 1e-6)`` when that is below 1, as ``torch.nn.utils.clip_grad_norm_``
does, so that the result is that of a single device up to summation order.
"""

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _reduce(value: torch.Tensor, group: dist.ProcessGroup, inf: bool) -> None:
    dist.all_reduce(value, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)


def reduction_dims(grad: DTensor) -> tuple[int, ...]:
    """The mesh dims over which the ranks hold different pieces of ``grad``.

    Every placement but ``Replicate`` counts: ``Shard``, but also the strided shards FSDP2
    gives tensor-parallel parameters (on torch 2.13 ``_StridedShard`` is not a ``Shard``
    subclass, so an ``isinstance`` test would drop the data-parallel sum of exactly those
    gradients) and any placement a later torch adds. Partial placements are reduced by
    the caller before this is asked.
    """
    return tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())


def _without_partial(grad: DTensor) -> DTensor:
    # A partial gradient's true value is the sum over its dim: the norm of the sum is not
    # a function of the local norms, so reduce it first (FSDP2 and the TP plans leave no
    # gradient partial; this keeps the norm right for modules that do).
    if not any(p.is_partial() for p in grad.placements):
        return grad
    placements = [Replicate() if p.is_partial() else p for p in grad.placements]
    return grad.redistribute(grad.device_mesh, placements)


def _local_power(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    # Sum of |g|^p (or max |g| for p = inf) over the given local tensors, in fp32.
    norms = torch._foreach_norm(tensors, norm_type, dtype=torch.float32)
    stacked = torch.stack([n.to(tensors[0].device) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum()


def total_grad_norm(
    parameters: Iterable[torch.Tensor],
    *,
    pp_group: dist.ProcessGroup | None = None,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """The norm of all gradients of the model, over every shard and pipeline rank.

    Every rank of the job must call this together (it runs collectives).

    Args:
        parameters: This rank's parameters (all its pipeline stages); those without a
            gradient are skipped.
        pp_group: The pipeline group (``DistributedContext.pp_group``); ``None`` or a
            group of one for a model that is not pipelined.
        norm_type: The norm's order (``2.0``, ``float("inf")``, ...).

    Returns:
        The global norm, an fp32 0-d tensor on the gradients' device, equal on all ranks.
    """
    norm_type = float(norm_type)
    inf = math.isinf(norm_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        device = grads[0].device if grads else _group_device(pp_group)
    total = torch.zeros((), dtype=torch.float32, device=device)
    # Gradients sharing a mesh and sharded dims reduce together: one collective per group.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        if isinstance(grad, DTensor):
            grad = _without_partial(grad)
            dims = reduction_dims(grad)
            groups.setdefault((id(grad.device_mesh), dims), []).append(grad)
        else:
            groups.setdefault((None, ()), []).append(grad)
    for (_, dims), members in groups.items():
        if isinstance(members[0], DTensor):
            mesh = members[0].device_mesh
            power = _local_power([g.to_local() for g in members], norm_type)
            for dim in dims:
                _reduce(power, mesh.get_group(dim), inf)
        else:
            power = _local_power(members, norm_type)
        total = torch.maximum(total, power) if inf else total + power
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        _reduce(total, pp_group, inf)
    return total if inf else total.pow(1.0 / norm_type)


def _group_device(group: dist.ProcessGroup) -> torch.device:
    # A rank without gradients must still join the collective on the group's device.
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device(torch.accelerator.current_accelerator().type)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float | None,
    *,
    pp_group: dist.ProcessGroup | None = None,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Clips gradients in place by the global norm (see :func:`total_grad_norm`).

    A non-finite norm leaves the gradients untouched: the caller should skip the
    optimizer step (the loop does, and logs it).

    Args:
        parameters: This rank's parameters (all its pipeline stages).
        max_norm: The largest norm allowed; ``None`` only measures.
        pp_group: The pipeline group (``None`` without pipelining).
        norm_type: The norm's order.

    Returns:
        The global norm before clipping (fp32, equal on every rank).
    """
    parameters = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(parameters, pp_group=pp_group, norm_type=norm_type)
    if max_norm is not None and parameters and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
