"""Default horizontal parallelism for Qwen3 Dense: where the FSDP2 units are chosen.

Units, inside one pipeline stage: the token embedding (first stage), **each entry of
``model.layers``** (the layer as the compile layer left it: compiled and/or checkpoint
wrapped, so the FSDP hooks run around the compiled region, not inside it), the final
norm together with the output head (last stage), and the root module. All of them are
HSDP over the ``("dp_replicate", "dp_cp_shard", "cp_replicate")`` slice of the dense
mesh, with gradients summed over data-parallel ranks.

:func:`apply_fsdp_qwen3_dense` is the FSDP2 step alone (the training stack's builder
applies tensor parallelism itself, earlier, before checkpointing and compile). The
``parallelize_qwen3_dense_*`` functions are both steps for a model a compile preset was
applied to: with ``tensor_parallel > 1`` the tensor-parallel plan
(``d9d.module.parallelism.model.qwen3_dense_tensor_parallel``) first, then FSDP2, which
shards the TP ``DTensor`` parameters over the data-parallel dims (2-D ``(dp, tp)``
parameters, HSDP x TP, and inside pipeline stages).

With context parallelism (``context_parallel_shard * context_parallel_replicate > 1``)
the context-parallel changes (``d9d.module.parallelism.model.qwen3_dense_context_parallel``)
are applied too; the weights are sharded over ``dp_cp_shard`` (data-parallel shard x
context-parallel shard ranks) and replicated over ``dp_replicate x cp_replicate``, and
gradients are summed over every one of those ranks.
"""

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from d9d.core.dist_context import DENSE_DOMAIN, DistributedContext
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.module.parallelism.api import parallelize_hsdp
from d9d.module.parallelism.model.qwen3_dense_context_parallel import (
    apply_context_parallel_qwen3_dense,
)
from d9d.module.parallelism.model.qwen3_dense_tensor_parallel import (
    apply_tensor_parallel_qwen3_dense,
)
from d9d.pipelining.api import PipelineStageInfo

HSDP_DIMS = ("dp_replicate", "dp_cp_shard", "cp_replicate")
"""The dims of the dense mesh that dense weights are sharded/replicated over."""


class _Plan:
    """The FSDP settings shared by every unit of one model."""

    def __init__(
        self,
        dist_context: DistributedContext,
        mp_policy: MixedPrecisionPolicy | None,
        reshard_after_forward: bool | None,
    ):
        params = dist_context.params
        self.mesh = dist_context.mesh_for(DENSE_DOMAIN)[HSDP_DIMS]
        self.mp_policy = mp_policy or MixedPrecisionPolicy()
        if reshard_after_forward is not None:
            self.layer_reshard: bool | None = reshard_after_forward
        elif params.pipeline_parallel > 1:
            # Every microbatch would otherwise all-gather each layer again in its forward
            # and once more in its backward.
            self.layer_reshard = False
        else:
            self.layer_reshard = None

    def shard(self, module: nn.Module | list[nn.Module], reshard: bool | None) -> None:
        parallelize_hsdp(
            module,
            self.mesh,
            "dp_cp_shard",
            mp_policy=self.mp_policy,
            reshard_after_forward=reshard,
        )

    def shard_backbone(self, model: Qwen3DenseModel, stage: PipelineStageInfo) -> None:
        if stage.is_current_stage_first:
            self.shard(model.embed_tokens, self.layer_reshard)
        for layer in model.layers.values():
            self.shard(layer, self.layer_reshard)

    def shard_root(self, module: nn.Module) -> None:
        # The root's own parameters are whatever no unit took (usually none); FSDP keeps
        # the root unsharded after forward by itself.
        self.shard(module, reshard=None)


def _head(model: nn.Module) -> nn.Module | None:
    if isinstance(model, Qwen3DenseForCausalLM):
        return model.lm_head
    if isinstance(model, Qwen3DenseForClassification):
        return model.cls_head
    return None


def apply_fsdp_qwen3_dense(
    dist_context: DistributedContext,
    model: nn.Module,
    stage: PipelineStageInfo,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """FSDP2 (HSDP) units of a Qwen3 Dense model or stage, without tensor/context parallelism.

    The embedding (first stage), each layer, the final norm with the head (last stage;
    never resharded after forward: the backward needs it right away) and the root. Call
    it after tensor parallelism, checkpointing and compile, before ``to_empty`` /
    ``reset_parameters()`` or loading a checkpoint.

    Args:
        dist_context: The distributed context.
        model: ``Qwen3DenseModel``, ``Qwen3DenseForCausalLM`` or
            ``Qwen3DenseForClassification``.
        stage: The pipeline stage ``model`` holds.
        mp_policy: FSDP2 mixed-precision policy (default: no casting). With a
            ``param_dtype``, also call ``model.set_compute_dtype(param_dtype)`` so that
            pipeline metadata matches (``d9d.stack.build_stage_modules`` does both).
        reshard_after_forward: ``fully_shard``'s flag for the embedding and the layers;
            ``None`` keeps FSDP2's default without pipelining and does not reshard under
            pipelining (each microbatch would all-gather again).
    """
    plan = _Plan(dist_context, mp_policy, reshard_after_forward)
    backbone = model if isinstance(model, Qwen3DenseModel) else model.model
    plan.shard_backbone(backbone, stage)
    if stage.is_current_stage_last and (head := _head(model)) is not None:
        plan.shard([backbone.norm, head], reshard=False)
    plan.shard_root(model)


def _parallelize(dist_context, model, stage, mp_policy, reshard_after_forward) -> None:
    # Context parallelism first: it refuses a classification model before TP changes it.
    apply_context_parallel_qwen3_dense(dist_context, model, stage)
    apply_tensor_parallel_qwen3_dense(dist_context, model, stage)
    apply_fsdp_qwen3_dense(
        dist_context,
        model,
        stage,
        mp_policy=mp_policy,
        reshard_after_forward=reshard_after_forward,
    )


def parallelize_qwen3_dense_model(
    dist_context: DistributedContext,
    model: Qwen3DenseModel,
    stage: PipelineStageInfo,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """Parallelizes the base Qwen3 Dense model components.

    Applies context parallelism and the tensor-parallel plan when the context asks for
    them, then HSDP to the embedding (first stage), each layer, and the root (which keeps
    the final norm of the last stage). Call it after the compile layer and before ``to_empty``/
    ``reset_parameters`` or loading a checkpoint.

    Current usage constraints:
    * Under tensor parallelism, shapes must split evenly (see
      ``validate_tensor_parallel``).
    * Under context parallelism, every stage input is a rank's head-tail shard of each
      row (``d9d.module.parallelism.context_parallel.shard_batch_for_context_parallel``).

    Args:
        dist_context: The distributed context.
        model: The Qwen3 Dense base model to parallelize.
        stage: Information about the current pipeline stage.
        mp_policy: See :func:`apply_fsdp_qwen3_dense`.
        reshard_after_forward: See :func:`apply_fsdp_qwen3_dense`.

    Raises:
        ValueError: If a dimension does not split evenly over the tensor-parallel degree.
    """
    _parallelize(dist_context, model, stage, mp_policy, reshard_after_forward)


def parallelize_qwen3_dense_for_causal_lm(
    dist_context: DistributedContext,
    model: Qwen3DenseForCausalLM,
    stage: PipelineStageInfo,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """Parallelizes the Qwen3 Dense Causal LM model.

    As ``parallelize_qwen3_dense_model`` (same arguments and errors), and on the last
    stage the final norm with the language-model head as one more FSDP2 unit, never
    resharded after forward (the backward needs it right away).
    """
    _parallelize(dist_context, model, stage, mp_policy, reshard_after_forward)


def parallelize_qwen3_dense_for_classification(
    dist_context: DistributedContext,
    model: Qwen3DenseForClassification,
    stage: PipelineStageInfo,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """Parallelizes the Qwen3 Dense classification model.

    As ``parallelize_qwen3_dense_model`` (same arguments and errors), and on the last
    stage the final norm with the classification head as one more FSDP2 unit. Context
    parallelism is refused (``ValueError``): the head pools chosen tokens of each row,
    which the sequence split scatters over the ranks.
    """
    _parallelize(dist_context, model, stage, mp_policy, reshard_after_forward)
