"""The one entry point that applies a compile preset to a model, in a fixed order.

Order (FSDP2 comes after, in ``d9d.module.parallelism``; ``d9d.stack`` runs the whole
sequence):
    1. float8: swap eligible linears for torchao float8 linears;
    (1b. the caller's ``before_checkpointing`` step: tensor parallelism in ``d9d.stack``;)
    2. activation checkpointing around each ``Qwen3DenseLayer``;
    3. ``torch.compile`` of each ``Qwen3DenseLayer`` (regional).
Float8 comes first so that the checkpoint policy sees (and can save) the float8 ops and
tensor parallelism can pick float8-aware styles; compile comes last so that all of them
are traced into each layer's compiled region.
"""

import dataclasses
import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn

from d9d.compile.activation_checkpointing import (
    LayerCheckpointPolicy,
    apply_activation_checkpointing,
)
from d9d.compile.config import CompileConfig
from d9d.compile.float8 import Float8Report, convert_linears_to_float8
from d9d.compile.regional import compile_layers, compile_loss_kernels
from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer
from d9d.module.model.qwen3_dense.model import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)

logger = logging.getLogger(__name__)

# Which models a config was applied to, without writing anything onto the user's module
# (weak: a model that is garbage-collected leaves the registry by itself).
_applied: "weakref.WeakKeyDictionary[nn.Module, CompileReport]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class CompileReport:
    """What :func:`apply_compile_config` did to a model (see :func:`get_compile_report`).

    Attributes:
        config: The applied config.
        steps: The steps applied, in order (e.g. ``["float8", "activation_checkpointing",
            "compile"]``).
        num_layers: Number of ``Qwen3DenseLayer`` modules on this stage.
        float8: The float8 conversion report, or ``None`` when float8 is off.
        checkpoint_policy: The layer checkpoint policy, or ``None`` for mode ``"none"``.
    """

    config: CompileConfig
    steps: list[str]
    num_layers: int
    float8: Float8Report | None = None
    checkpoint_policy: LayerCheckpointPolicy | None = None


def _backbone(model: nn.Module) -> Qwen3DenseModel:
    if isinstance(model, Qwen3DenseModel):
        return model
    if isinstance(model, Qwen3DenseForCausalLM | Qwen3DenseForClassification):
        return model.model
    raise ValueError(
        "apply_compile_config expects Qwen3DenseModel, Qwen3DenseForCausalLM or "
        f"Qwen3DenseForClassification, got {type(model).__name__}"
    )


def _validate(model: nn.Module, backbone: Qwen3DenseModel, config: CompileConfig) -> None:
    previous = _applied.get(model)
    if previous is not None:
        raise ValueError(
            f"compile config {previous.config.name!r} was already applied to this model; "
            f"build a fresh model to apply {config.name!r}"
        )
    mode = config.activation_checkpointing.mode
    if mode == "memory_budget" and not config.compile.enabled:
        raise ValueError(
            f"compile config {config.name!r}: activation_checkpointing.mode='memory_budget' "
            "needs compile.enabled=true (the budget is enforced by the compiler's partitioner)"
        )
    if mode == "memory_budget" and not hasattr(
        torch.autograd.graph, "region_activation_memory_budget"
    ):
        raise ValueError(
            f"compile config {config.name!r}: activation_checkpointing.mode='memory_budget' "
            f"needs torch >= 2.13 (torch.autograd.graph.region_activation_memory_budget); "
            f"this is torch {torch.__version__}. Use a 'selective' or 'full' preset instead"
        )
    if mode != "none" and backbone.enable_checkpointing:
        raise ValueError(
            f"compile config {config.name!r} asks for activation_checkpointing.mode={mode!r}, "
            "but the model was built with enable_checkpointing=True, which already "
            "checkpoints every layer; build it with enable_checkpointing=False"
        )


def apply_compile_config(
    model: nn.Module,
    config: CompileConfig,
    *,
    before_checkpointing: Callable[[nn.Module], bool] | None = None,
) -> CompileReport:
    """Applies float8, the checkpoint policy and regional compile to ``model``, in place.

    Works on a whole model or one pipeline stage, and on a model built on ``meta`` (call
    ``to_empty`` + ``reset_parameters()`` afterwards, as usual). Layers stay in
    ``layers`` under their names, so state-dict keys are unchanged and each layer can
    then be wrapped as one FSDP2 unit.

    Args:
        model: ``Qwen3DenseForCausalLM``, ``Qwen3DenseForClassification`` or
            ``Qwen3DenseModel``.
        config: The compile config (see :func:`d9d.compile.load_compile_config`).
        before_checkpointing: Called with ``model`` after float8 and before activation
            checkpointing and compile; returns whether it changed the model (reported as
            step ``"tensor_parallel"``). ``d9d.stack.build_stage_modules`` passes the
            tensor-parallel plan here.

    Returns:
        What was applied (also available later from :func:`get_compile_report`).

    Raises:
        ValueError: If a config was already applied, ``memory_budget`` is asked without
            compile, a checkpoint policy is asked of a model built with
            ``enable_checkpointing=True``, or ``model`` is of an unsupported type.
        RuntimeError: If float8 is asked where it cannot run (no torchao, old GPU).
    """
    backbone = _backbone(model)
    _validate(model, backbone, config)
    layers = list(backbone.layers.values())
    assert all(isinstance(layer, Qwen3DenseLayer) for layer in layers)
    report = CompileReport(config=config, steps=[], num_layers=len(layers))
    backbone.set_attention_backend(config.attention.backend)
    logger.info("applying compile config %r to %d layers", config.name, len(layers))

    if config.float8.enabled:
        logger.info("step 1/3: float8 (%s)", config.float8.recipe)
        report.float8 = convert_linears_to_float8(model, config.float8)
        report.steps.append("float8")
    if before_checkpointing is not None and before_checkpointing(model):
        logger.info("step 1b/3: tensor parallelism")
        report.steps.append("tensor_parallel")
    if config.activation_checkpointing.mode != "none":
        logger.info("step 2/3: activation checkpointing (%s)", config.activation_checkpointing.mode)
        report.checkpoint_policy = apply_activation_checkpointing(
            layers, config.activation_checkpointing
        )
        report.steps.append("activation_checkpointing")
    if config.compile.enabled:
        logger.info(
            "step 3/3: regional torch.compile (backend=%s, mode=%s, fullgraph=%s)",
            config.compile.backend,
            config.compile.mode,
            config.compile.fullgraph,
        )
        compile_layers(layers, config.compile)
        report.steps.append("compile")
        if compile_loss_kernels(model, config.compile):
            logger.info("step 3/3: fused compiled kernels for the LM-head loss")
            report.steps.append("compile_loss")
    _applied[model] = report
    return report


def get_compile_report(model: nn.Module) -> CompileReport | None:
    """Returns what :func:`apply_compile_config` did to ``model`` (``None`` if nothing)."""
    return _applied.get(model)
