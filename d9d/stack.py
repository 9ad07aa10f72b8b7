"""The one builder of the training stack: every local pipeline stage, ready to train.

For each pipeline stage this rank runs, :func:`build_stage_modules` calls each step of the
stack once, in this order:

1. build the stage module on ``meta`` (its layers come from ``PipelineStageInfo``) and
   give it the parameter dtype;
2. float8 linears (``d9d.compile.apply_float8``);
3. tensor parallelism (``apply_tensor_parallel_qwen3_dense``: DTensor plans on the ``tp``
   mesh dim, when it is above 1), then context parallelism
   (``apply_context_parallel_qwen3_dense``: each layer gathers K/V over the ``cp`` group,
   when its degree is above 1; the batches are sharded by
   ``shard_batch_for_context_parallel``);
4. activation checkpointing around each ``Qwen3DenseLayer``
   (``d9d.compile.apply_checkpointing``);
5. regional ``torch.compile`` of each layer (``d9d.compile.apply_compile``);
6. FSDP2 (``apply_fsdp_qwen3_dense``): each layer one unit, then the embedding, the norm
   with the head, and the root, with the preset's mixed-precision policy (over the
   data-parallel dims; with tensor parallelism the parameters are 2-D DTensors);
7. ``to_empty`` on the device, then initialise: ``reset_parameters()`` from a seed, or an
   HF checkpoint folder, or nothing (a DCP checkpoint will be loaded next).

Float8 comes before tensor parallelism so that float8 linears get float8-aware styles,
and before the checkpoint policy so that the policy sees the float8 ops; the TP
collectives then sit inside the checkpointed, compiled layer; compile wraps them all;
FSDP2 goes around the compiled layer so that its hooks stay outside the graph;
materialising last means no full-size model ever exists on one rank.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from d9d.compile import (
    CompileConfig,
    CompileReport,
    apply_checkpointing,
    apply_compile,
    apply_float8,
    prepare_compile_config,
)
from d9d.core.dist_context import DeviceMeshParameters, DistributedContext
from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassification,
    Qwen3DenseForClassificationParameters,
)
from d9d.module.parallelism.init import init_stage_parameters
from d9d.module.parallelism.model.qwen3_dense import apply_fsdp_qwen3_dense
from d9d.module.parallelism.model.qwen3_dense_context_parallel import (
    apply_context_parallel_qwen3_dense,
)
from d9d.module.parallelism.model.qwen3_dense_tensor_parallel import (
    apply_tensor_parallel_qwen3_dense,
    check_checkpointing_for_tensor_parallel,
)
from d9d.pipelining.api import PipelineStageInfo

logger = logging.getLogger(__name__)

ModelParameters = Qwen3DenseForCausalLMParameters | Qwen3DenseForClassificationParameters
Init = str | Path | Callable[[list[nn.Module]], None] | None


@dataclass
class StageModules:
    """This rank's pipeline stages, built, parallelized and initialised.

    Attributes:
        modules: The stage modules, in the order of ``infos``.
        infos: Their ``PipelineStageInfo`` (rank ``r`` runs stages ``r, r + pp, ...``).
        reports: What the compile preset did to each module.
        compute_dtype: The dtype activations travel in between stages.
        dist_context: The distributed context (``None`` for a plain single process).
        params: The model parameters the stages were built from.
    """

    modules: list[nn.Module]
    infos: list[PipelineStageInfo]
    reports: list[CompileReport]
    compute_dtype: torch.dtype
    dist_context: DistributedContext | None
    params: ModelParameters
    compile_config: CompileConfig = field(default_factory=CompileConfig)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of every local stage (for the optimizer)."""
        for module in self.modules:
            yield from module.parameters()

    @property
    def has_first_stage(self) -> bool:
        """Whether this rank runs the first pipeline stage."""
        return any(info.is_current_stage_first for info in self.infos)

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage (and sees the loss)."""
        return any(info.is_current_stage_last for info in self.infos)


def _model_class(params: ModelParameters) -> type[nn.Module]:
    if isinstance(params, Qwen3DenseForCausalLMParameters):
        return Qwen3DenseForCausalLM
    if isinstance(params, Qwen3DenseForClassificationParameters):
        return Qwen3DenseForClassification
    raise ValueError(
        "build_stage_modules takes Qwen3DenseForCausalLMParameters or "
        f"Qwen3DenseForClassificationParameters, got {type(params).__name__}"
    )


def build_stage_modules(
    params: ModelParameters,
    compile_config: CompileConfig | None = None,
    dist_context: DistributedContext | None = None,
    *,
    num_stages_per_rank: int = 1,
    hidden_states_snapshot_mode: HiddenStatesAggregationMode | str = "no",
    param_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    init: Init = "reset",
    seed: int = 0,
) -> StageModules:
    """Builds this rank's pipeline stage modules in the training stack's order.

    Args:
        params: Causal-LM or classification parameters.
        compile_config: The compile preset (``d9d.compile.load_compile_config``);
            ``None`` is plain eager. Its ``[fsdp]`` section gives the mixed-precision
            policy (e.g. fp32 parameters, bf16 compute, fp32 reduction) and resharding.
        dist_context: The distributed context. ``None`` builds one process without
            FSDP2, unless the preset asks for mixed precision: FSDP2 then runs on a
            world of one (``DeviceMeshParameters().build()``).
        num_stages_per_rank: Pipeline stages per rank (> 1 for interleaved schedules).
        hidden_states_snapshot_mode: ``"no"`` or ``"mean"``.
        param_dtype: Dtype of the parameters (and of the optimizer state). With a
            mixed-precision preset keep fp32; for pure bf16 training pass
            ``torch.bfloat16`` with a preset without ``[fsdp] param_dtype``.
        device: Where to materialise (default: the context's device, else the CPU).
        init: ``"reset"`` (PyTorch's default initialisation, seeded per unit so that
            the weights do not depend on the layout, see
            ``d9d.module.parallelism.init``), the path of an HF checkpoint folder
            (``load_hf_checkpoint``), a callable given the modules, or ``None``
            (parameters left uninitialised, for a checkpoint load that follows).
        seed: Seed of ``"reset"``: the same seed gives the same weights under every
            layout (one process, FSDP2/HSDP, any pipeline split).

    Returns:
        The stage modules with their infos, compile reports and compute dtype.

    Raises:
        ValueError: For unsupported parameters, bad stage counts, or a compile preset
            that cannot apply (see ``apply_compile_config``).
    """
    compile_config = compile_config or CompileConfig(name="eager")
    model_cls = _model_class(params)
    if num_stages_per_rank < 1:
        raise ValueError(f"num_stages_per_rank must be >= 1, got {num_stages_per_rank}")
    fsdp = compile_config.fsdp
    if dist_context is None and fsdp.is_mixed_precision:
        logger.info("mixed precision needs FSDP2: building a world-of-one process group")
        dist_context = DeviceMeshParameters().build()
    if dist_context is not None:
        stage_ids = dist_context.local_pipeline_stages(num_stages_per_rank)
        num_stages = dist_context.pp_size * num_stages_per_rank
    else:
        stage_ids = list(range(num_stages_per_rank))
        num_stages = num_stages_per_rank
    device = torch.device(device) if device is not None else _default_device(dist_context)
    compute_dtype = fsdp.torch_param_dtype() or param_dtype
    if dist_context is not None:
        check_checkpointing_for_tensor_parallel(
            compile_config.activation_checkpointing.mode,
            compile_config.compile.enabled,
            dist_context.params.tensor_parallel,
            f"compile config {compile_config.name!r}",
        )
    infos = [PipelineStageInfo(stage, num_stages) for stage in stage_ids]
    modules, reports = [], []
    for info in infos:
        logger.info("building stage %d/%d", info.current_stage + 1, info.num_stages)
        with torch.device("meta"):
            module = model_cls(
                params,
                info,
                hidden_states_snapshot_mode=hidden_states_snapshot_mode,
                enable_checkpointing=False,
            )
        module.to(param_dtype)
        report = prepare_compile_config(module, compile_config)
        apply_float8(module, report)
        if dist_context is not None and apply_tensor_parallel_qwen3_dense(
            dist_context, module, info
        ):
            logger.info("tensor parallelism (tp=%d)", dist_context.params.tensor_parallel)
            report.steps.append("tensor_parallel")
        if dist_context is not None and apply_context_parallel_qwen3_dense(
            dist_context, module, info
        ):
            logger.info("context parallelism (cp=%d)", dist_context.cp_size)
            report.steps.append("context_parallel")
        apply_checkpointing(module, report)
        apply_compile(module, report)
        if dist_context is not None:
            apply_fsdp_qwen3_dense(
                dist_context,
                module,
                info,
                mp_policy=fsdp.mp_policy(),
                reshard_after_forward=fsdp.reshard_after_forward,
            )
        if compute_dtype != param_dtype:
            # Activations leave the stage in the compute dtype: pipeline metadata must match.
            module.model.set_compute_dtype(compute_dtype)
        module.to_empty(device=device)
        modules.append(module)
        reports.append(report)
    _initialise(modules, init, seed, params, hidden_states_snapshot_mode)
    return StageModules(
        modules=modules,
        infos=infos,
        reports=reports,
        compute_dtype=compute_dtype,
        dist_context=dist_context,
        params=params,
        compile_config=compile_config,
    )


def _default_device(dist_context: DistributedContext | None) -> torch.device:
    if dist_context is not None:
        return dist_context.device
    return torch.device("cpu")


def _initialise(
    modules: Sequence[nn.Module],
    init: Init,
    seed: int,
    params: ModelParameters,
    snapshot_mode: HiddenStatesAggregationMode | str,
) -> None:
    if init is None:
        return
    if callable(init):
        init(list(modules))
        return
    if init == "reset":
        for module in modules:
            with torch.device("meta"):
                shadow = _model_class(params)(
                    params,
                    module.stage,
                    hidden_states_snapshot_mode=snapshot_mode,
                    enable_checkpointing=False,
                )
            init_stage_parameters(module, shadow, seed)
        return
    folder = Path(init)
    if not folder.is_dir():
        raise ValueError(
            f"init={str(init)!r} is neither 'reset', None, a callable nor an HF checkpoint folder"
        )
    from d9d.module.model.qwen3_dense.hf_io import load_hf_checkpoint

    for module in modules:
        load_hf_checkpoint(module, folder)
