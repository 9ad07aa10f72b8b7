"""Context parallelism for Qwen3 Dense: what changes in a model when the sequence is split.

On the ``cp`` group of the batch mesh (``context_parallel_shard x
context_parallel_replicate`` ranks that read the same rows), per pipeline stage:

* the stage's inputs are this rank's head-tail shard of every row
  (``d9d.module.parallelism.context_parallel.shard_batch_for_context_parallel``), with the
  global ``position_ids``; hidden states travel between stages as local shards;
* the backbone builds, once per stage forward, the mask of its local queries over the
  keys of the whole group (causal by global index, same document) and RoPE from the
  global positions;
* every attention layer all-gathers K and V (after the k-norm and RoPE) over the group;
  its backward reduce-scatters their gradients. Nothing else in a layer communicates:
  norms, projections, the MLP and the per-token loss are local to each token;
* hidden-state snapshots (``mean``): the masked means are summed over the group, so each
  rank holds the snapshot of whole rows; the sum is differentiable (each rank's loss is a
  term of the global loss);
* the classification head is refused: it pools chosen tokens of each row, which the
  head-tail split scatters over the ranks, and its per-row labels do not split.

Weights are not touched here: FSDP2 (``d9d.module.parallelism.model.qwen3_dense``) shards
them over ``dp_cp_shard`` (data-parallel shard x context-parallel shard ranks) and
replicates them over ``dp_replicate x cp_replicate``; gradients are summed over all of
them, so a loss normalised by the global count of valid tokens (every data-parallel and
context-parallel rank) gives the single-device gradient.
"""

from torch import nn

from d9d.core.dist_context import DistributedContext
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.module.parallelism.context_parallel import ContextParallelGroup
from d9d.pipelining.api import PipelineStageInfo


def _backbone(model: nn.Module) -> Qwen3DenseModel:
    if isinstance(model, Qwen3DenseForClassification):
        raise ValueError(
            "context parallelism does not support Qwen3DenseForClassification: its head "
            "pools chosen tokens of each row (the head-tail split scatters them over the "
            "context-parallel ranks) against one label per row; use "
            "context_parallel_shard=context_parallel_replicate=1 for classification"
        )
    if isinstance(model, Qwen3DenseModel):
        return model
    if isinstance(model, Qwen3DenseForCausalLM):
        return model.model
    raise ValueError(
        "context parallelism expects Qwen3DenseModel or Qwen3DenseForCausalLM, got "
        f"{type(model).__name__}"
    )


def apply_context_parallel_qwen3_dense(
    dist_context: DistributedContext, model: nn.Module, stage: PipelineStageInfo
) -> bool:
    """Makes a Qwen3 Dense model or stage attend across its context-parallel group.

    Works on a model built on ``meta`` and before or after the compile preset (compile
    is lazy; the layers read the group at their first call); changes no parameter.
    ``d9d.stack.build_stage_modules`` calls it after tensor parallelism, and so do
    ``parallelize_qwen3_dense_*`` (the manual order).

    Args:
        dist_context: The distributed context (its ``cp`` group and rank).
        model: ``Qwen3DenseModel`` or ``Qwen3DenseForCausalLM``.
        stage: The pipeline stage ``model`` holds.

    Returns:
        Whether the model is now context-parallel (``False`` for a degree of 1).

    Raises:
        ValueError: For a classification model (see the module docstring) or another
            model type, or a model that is context-parallel already.
    """
    del stage  # every stage changes the same way
    if dist_context.cp_size == 1:
        return False
    group = ContextParallelGroup(dist_context.cp_group, dist_context.cp_rank, dist_context.cp_size)
    enable_context_parallel(model, group)
    return True


def enable_context_parallel(model: nn.Module, group: ContextParallelGroup) -> None:
    """Makes ``model`` (a Qwen3 Dense model or stage) attend across ``group``, in place.

    The lower-level half of :func:`apply_context_parallel_qwen3_dense`, for a group that
    does not come from a ``DistributedContext`` (e.g. two ranks sharing one GPU over
    gloo).

    Raises:
        ValueError: As :func:`apply_context_parallel_qwen3_dense`.
    """
    backbone = _backbone(model)
    if backbone.context_parallel is not None:
        raise ValueError("context parallelism was already applied to this model")
    backbone.context_parallel = group
    # One callable shared by every layer: a compiled layer's guards on it hold for all of
    # them, so one graph still serves every layer.
    gather = group.gather_key_value
    for layer in backbone.layers.values():
        layer.self_attn.kv_gather = gather
