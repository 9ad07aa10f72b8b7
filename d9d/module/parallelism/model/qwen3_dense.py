"""Default horizontal parallelism for Qwen3 Dense: where the FSDP2 units are chosen.

Units, inside one pipeline stage: the token embedding (first stage), **each entry of
``model.layers``** (the layer as the compile layer left it: compiled and/or checkpoint
wrapped, so the FSDP hooks run around the compiled region, not inside it), the final
norm together with the output head (last stage), and the root module. All of them are
HSDP over the ``("dp_replicate", "dp_cp_shard", "cp_replicate")`` slice of the dense
mesh, with gradients summed over data-parallel ranks.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from d9d.core.dist_context import DENSE_DOMAIN, DistributedContext
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.module.parallelism.api import parallelize_hsdp
from d9d.pipelining.api import PipelineStageInfo

if TYPE_CHECKING:
    from d9d.compile import CompileConfig

HSDP_DIMS = ("dp_replicate", "dp_cp_shard", "cp_replicate")
"""The dims of the dense mesh that dense weights are sharded/replicated over."""


class _Plan:
    """The FSDP settings shared by every unit of one model."""

    def __init__(self, dist_context: DistributedContext, compile_config: "CompileConfig | None"):
        params = dist_context.params
        if params.is_tensor_parallel:
            raise ValueError(
                f"tensor parallelism (tensor_parallel={params.tensor_parallel}) is not "
                "supported for Qwen3 Dense yet"
            )
        if params.is_context_parallel:
            raise ValueError(
                "context parallelism (context_parallel_shard="
                f"{params.context_parallel_shard}, context_parallel_replicate="
                f"{params.context_parallel_replicate}) is not supported for Qwen3 Dense yet"
            )
        self.mesh = dist_context.mesh_for(DENSE_DOMAIN)[HSDP_DIMS]
        fsdp = compile_config.fsdp if compile_config is not None else None
        self.param_dtype: torch.dtype | None = fsdp.torch_param_dtype() if fsdp else None
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=self.param_dtype,
            reduce_dtype=fsdp.torch_reduce_dtype() if fsdp else None,
        )
        explicit = fsdp.reshard_after_forward if fsdp else None
        if explicit is not None:
            self.layer_reshard: bool | None = explicit
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

    def shard_root(self, module: nn.Module) -> None:
        # The root's own parameters are whatever no unit took (usually none); FSDP keeps
        # the root unsharded after forward by itself.
        self.shard(module, reshard=None)


def _shard_backbone(model: Qwen3DenseModel, stage: PipelineStageInfo, plan: _Plan) -> None:
    if plan.param_dtype is not None:
        # Stage outputs come out in the compute dtype; infer_stage_* must say so.
        model._d9d_compute_dtype = plan.param_dtype
    if stage.is_current_stage_first:
        plan.shard(model.embed_tokens, plan.layer_reshard)
    for layer in model.layers.values():
        plan.shard(layer, plan.layer_reshard)


def parallelize_qwen3_dense_model(
    dist_context: DistributedContext,
    model: Qwen3DenseModel,
    stage: PipelineStageInfo,
    *,
    compile_config: "CompileConfig | None" = None,
) -> None:
    """Parallelizes the base Qwen3 Dense model components.

    Applies HSDP to the embedding (first stage), each layer, and the root (which keeps
    the final norm of the last stage). Call it after the compile layer and before
    ``to_empty``/``reset_parameters`` or loading a checkpoint.

    Current usage constraints:
    * Tensor Parallelism is not supported (we may implement it later).
    * Context Parallelism is not supported (we will implement it later).

    Args:
        dist_context: The distributed context.
        model: The Qwen3 Dense base model to parallelize.
        stage: Information about the current pipeline stage.
        compile_config: Optional compile config; its ``fsdp`` section gives the
            mixed-precision dtypes and ``reshard_after_forward``. Without it nothing is
            cast, and layers are resharded after forward unless pipelining is on.

    Raises:
        ValueError: If Tensor Parallel or Context Parallel is enabled in the context.
    """
    plan = _Plan(dist_context, compile_config)
    _shard_backbone(model, stage, plan)
    plan.shard_root(model)


def parallelize_qwen3_dense_for_causal_lm(
    dist_context: DistributedContext,
    model: Qwen3DenseForCausalLM,
    stage: PipelineStageInfo,
    *,
    compile_config: "CompileConfig | None" = None,
) -> None:
    """Parallelizes the Qwen3 Dense Causal LM model.

    The backbone is parallelized as in ``parallelize_qwen3_dense_model``; the final norm
    and the language-model head form one more unit (never resharded after forward: the
    backward needs it right away).

    Args:
        dist_context: The distributed context containing device meshes and topology info.
        model: The Qwen3 Dense Causal LM model to parallelize.
        stage: Information about the current pipeline stage.
        compile_config: See ``parallelize_qwen3_dense_model``.

    Raises:
        ValueError: If Tensor Parallel or Context Parallel is enabled in the context.
    """
    plan = _Plan(dist_context, compile_config)
    _shard_backbone(model.model, stage, plan)
    if stage.is_current_stage_last:
        plan.shard([model.model.norm, model.lm_head], reshard=False)
    plan.shard_root(model)


def parallelize_qwen3_dense_for_classification(
    dist_context: DistributedContext,
    model: Qwen3DenseForClassification,
    stage: PipelineStageInfo,
    *,
    compile_config: "CompileConfig | None" = None,
) -> None:
    """Parallelizes the Qwen3 Dense classification model.

    The backbone is parallelized as in ``parallelize_qwen3_dense_model``; the final norm
    and the classification head form one more unit (never resharded after forward).

    Args:
        dist_context: The distributed context containing device meshes and topology info.
        model: The Qwen3 Dense classification model to parallelize.
        stage: Information about the current pipeline stage.
        compile_config: See ``parallelize_qwen3_dense_model``.

    Raises:
        ValueError: If Tensor Parallel or Context Parallel is enabled in the context.
    """
    plan = _Plan(dist_context, compile_config)
    _shard_backbone(model.model, stage, plan)
    if stage.is_current_stage_last:
        plan.shard([model.model.norm, model.cls_head], reshard=False)
    plan.shard_root(model)
