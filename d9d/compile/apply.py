"""The compile preset's steps, each its own function, and the whole preset in one call.

The steps, in the training stack's order (``d9d.stack.build_stage_modules`` calls each
one itself, with tensor parallelism between float8 and checkpointing, and FSDP2 after):

    1. :func:`apply_float8`: swap eligible linears for torchao float8 linears;
    2. :func:`apply_checkpointing`: activation checkpointing around each
       ``Qwen3DenseLayer``;
    3. :func:`apply_compile`: ``torch.compile`` of each ``Qwen3DenseLayer`` (regional),
       plus the fused LM-head loss kernels.

Float8 comes first so that the checkpoint policy sees (and can save) the float8 ops and
tensor parallelism can pick float8-aware styles; compile comes last so that all of them
are traced into each layer's compiled region. :func:`apply_compile_config` runs the three
in order, for a user applying a whole preset to their own model.

Each step records what it did in a :class:`CompileReport`; nothing is registered on the
side: whether a preset was already applied is read off the model itself (float8 linears,
checkpointed or compiled layers).
"""

import dataclasses
import logging

import torch
from torch import nn

from d9d.compile.activation_checkpointing import (
    LayerCheckpointPolicy,
    apply_activation_checkpointing,
)
from d9d.compile.config import CompileConfig
from d9d.compile.float8 import Float8Report, convert_linears_to_float8, is_float8_linear
from d9d.compile.regional import compile_layers, compile_loss_kernels
from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer
from d9d.module.model.qwen3_dense.model import Qwen3DenseModel, backbone_of

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileReport:
    """What the compile steps did to a model.

    Attributes:
        config: The applied config.
        steps: The steps applied, in order (e.g. ``["float8", "tensor_parallel",
            "activation_checkpointing", "compile"]``).
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
    return backbone_of(model, "a compile config")


def _layers(model: nn.Module) -> list[Qwen3DenseLayer]:
    layers = list(_backbone(model).layers.values())
    assert all(isinstance(layer, Qwen3DenseLayer) for layer in layers)
    return layers


def _already_applied(model: nn.Module) -> str | None:
    for layer in _layers(model):
        if layer.is_compiled:
            return "its layers are compiled"
        if layer.checkpoint_policy is not None:
            return "its layers are checkpointed"
    if any(is_float8_linear(module) for module in model.modules()):
        return "it holds float8 linears"
    return None


def prepare_compile_config(model: nn.Module, config: CompileConfig) -> CompileReport:
    """Checks that ``config`` can apply to ``model`` and starts its report.

    Also selects the attention backend of the config (``[attention] backend``).

    Args:
        model: ``Qwen3DenseForCausalLM``, ``Qwen3DenseForClassification`` or
            ``Qwen3DenseModel`` (or one pipeline stage of them), on any device.
        config: The compile config (see :func:`d9d.compile.load_compile_config`).

    Returns:
        An empty report, filled by the steps.

    Raises:
        ValueError: If a compile config was already applied to the model,
            ``memory_budget`` is asked without compile or on a torch without it, a
            checkpoint policy is asked of a model built with
            ``enable_checkpointing=True``, or ``model`` is of an unsupported type.
    """
    backbone = _backbone(model)
    applied = _already_applied(model)
    if applied is not None:
        raise ValueError(
            f"a compile config was already applied to this model ({applied}); build a "
            f"fresh model to apply {config.name!r}"
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
    backbone.set_attention_backend(config.attention.backend)
    layers = _layers(model)
    logger.info("applying compile config %r to %d layers", config.name, len(layers))
    return CompileReport(config=config, steps=[], num_layers=len(layers))


def apply_float8(model: nn.Module, report: CompileReport) -> None:
    """Step 1: float8 linears, when the config enables them.

    Args:
        model: The model or stage (see :func:`prepare_compile_config`).
        report: The report of :func:`prepare_compile_config`; gets the float8 report.

    Raises:
        RuntimeError: If float8 is asked where it cannot run (no torchao, old GPU).
    """
    section = report.config.float8
    if not section.enabled:
        return
    logger.info("float8 (%s)", section.recipe)
    report.float8 = convert_linears_to_float8(model, section)
    report.steps.append("float8")


def apply_checkpointing(model: nn.Module, report: CompileReport) -> None:
    """Step 2: the activation-checkpoint policy around each layer (mode ``"none"``: none).

    Args:
        model: The model or stage.
        report: The report of :func:`prepare_compile_config`; gets the policy.
    """
    section = report.config.activation_checkpointing
    if section.mode == "none":
        return
    logger.info("activation checkpointing (%s)", section.mode)
    report.checkpoint_policy = apply_activation_checkpointing(_layers(model), section)
    report.steps.append("activation_checkpointing")


def apply_compile(model: nn.Module, report: CompileReport) -> None:
    """Step 3: regional ``torch.compile`` of each layer and the fused LM-head loss kernels.

    Args:
        model: The model or stage.
        report: The report of :func:`prepare_compile_config`.
    """
    section = report.config.compile
    if not section.enabled:
        return
    logger.info(
        "regional torch.compile (backend=%s, fullgraph=%s)", section.backend, section.fullgraph
    )
    compile_layers(_layers(model), section)
    report.steps.append("compile")
    if compile_loss_kernels(model, section):
        logger.info("fused compiled kernels for the LM-head loss")
        report.steps.append("compile_loss")


def apply_compile_config(model: nn.Module, config: CompileConfig) -> CompileReport:
    """Applies float8, the checkpoint policy and regional compile to ``model``, in place.

    Works on a whole model or one pipeline stage, and on a model built on ``meta`` (call
    ``to_empty`` + ``reset_parameters()`` afterwards, as usual). Layers stay in
    ``layers`` under their names, so state-dict keys are unchanged and each layer can
    then be wrapped as one FSDP2 unit (``parallelize_qwen3_dense_*``, which also applies
    tensor parallelism after this).

    Args:
        model: ``Qwen3DenseForCausalLM``, ``Qwen3DenseForClassification`` or
            ``Qwen3DenseModel``.
        config: The compile config (see :func:`d9d.compile.load_compile_config`).

    Returns:
        What was applied.

    Raises:
        ValueError: See :func:`prepare_compile_config`.
        RuntimeError: If float8 is asked where it cannot run (no torchao, old GPU).
    """
    report = prepare_compile_config(model, config)
    apply_float8(model, report)
    apply_checkpointing(model, report)
    apply_compile(model, report)
    return report
