"""Generic tensor-parallel (DTensor) styles that ``torch.distributed.tensor.parallel`` lacks.

The stock styles (``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``) cover the
linears and norms of a transformer layer. Three more pieces are needed around them:

* :class:`VocabParallelEmbedding`: each ``nn.Embedding`` of a split vocabulary sharded by
  rows (its vocabulary); the owning module looks tokens up in its local rows and the
  partial sums travel as one reduce-scatter onto the sequence dimension;
* :class:`ReplicateFirstInput`: the first input of a module (the sequence-sharded
  residual stream) all-gathered once before the projections that need all of it, with
  other arguments (RoPE tables, masks) passed through untouched;
* :class:`VocabParallelWeights`: output-head weights sharded by rows (vocabulary), used
  by a head that computes its own vocab-parallel loss and never calls the linears.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def _shard_rows(module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(
            distribute_tensor(param, mesh, [Shard(0)]), requires_grad=param.requires_grad
        )
        module.register_parameter(param_name, sharded)


class VocabParallelEmbedding(ParallelStyle):
    """Shards the weight of every ``nn.Embedding`` below the module by rows (vocabulary).

    The module's forward sees DTensor weights and performs the lookup itself (see
    ``SplitTokenEmbeddings``): each rank reads the tokens its rows hold, the others give
    zeros, and the sum over ranks is reduce-scattered onto the sequence dimension.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for submodule in module.modules():
            if isinstance(submodule, nn.Embedding):
                _shard_rows(submodule, device_mesh)
        return module


class VocabParallelWeights(ParallelStyle):
    """Shards the weight of every ``nn.Linear`` below the module by rows (output features).

    For output heads whose forward uses the weights directly (e.g. a fused loss); the
    linears' own forward is never called, so no input/output hooks are installed.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for submodule in module.modules():
            if isinstance(submodule, nn.Linear):
                if submodule.bias is not None:
                    raise ValueError("VocabParallelWeights expects bias-free linears")
                _shard_rows(submodule, device_mesh)
        return module


class ReplicateFirstInput(ParallelStyle):
    """Redistributes the module's first input from ``Shard(seq_dim)`` to ``Replicate``.

    The input must already be a DTensor on the tensor-parallel mesh (the residual
    stream); the remaining positional and keyword arguments pass through unchanged, so
    the module may take optional extras (RoPE tables, attention masks).

    Args:
        seq_dim: The dimension the input is sharded over.
    """

    def __init__(self, seq_dim: int = 1):
        super().__init__()
        self.seq_dim = seq_dim

    def _gather(self, mesh: DeviceMesh, value):
        if not isinstance(value, DTensor):
            raise ValueError(
                f"expected a DTensor residual stream on the tensor-parallel mesh, got "
                f"{type(value).__name__}"
            )
        return value.redistribute(mesh, [Replicate()])

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def pre_hook(_module, args, kwargs):
            if args:
                return (self._gather(device_mesh, args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: self._gather(device_mesh, kwargs[key])}

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return module


def full_local(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a plain tensor, identical on every rank of its mesh.

    A DTensor is all-gathered (``Replicate``); its gradient is then expected complete
    and identical on every rank (not a partial sum). A plain tensor is returned as is.
    """
    if isinstance(tensor, DTensor):
        return tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim).to_local()
    return tensor
