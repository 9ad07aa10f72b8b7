"""Activation-checkpoint policies around each ``Qwen3DenseLayer``.

Where checkpointing is decided: :func:`apply_activation_checkpointing` turns every layer
into a :class:`CheckpointedQwen3DenseLayer` (a subclass, switched in place like FSDP2
does), whose ``forward`` runs the original one under the policy. Keeping the layer
object itself (rather than wrapping it in a new module) leaves parameter and state-dict
names untouched and lets the layer stay one FSDP2 unit; because the policy lives in
``forward``, a later ``Module.compile`` traces it into the layer's compiled region.

Policies:
    * ``full``: ``torch.utils.checkpoint`` over the layer; only its inputs are kept.
    * ``selective``: the same, with a ``create_selective_checkpoint_contexts`` policy
      that saves the outputs of chosen ops (matmuls, attention...) and recomputes the
      rest; optionally only every other matmul is saved. The context-parallel K/V
      all-gather is always saved: recomputing it would run the collective again.
    * ``memory_budget``: no checkpoint call; the forward is annotated with
      ``torch.autograd.graph.region_activation_memory_budget`` so the compiler's min-cut
      partitioner picks what to recompute under the budget. Compile only.
"""

import dataclasses
import functools
import sys
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from d9d.compile.config import ActivationCheckpointingSection, resolve_op
from d9d.core.log_filters import install_log_filter
from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer
from d9d.module.parallelism.context_parallel import KV_ALL_GATHER_OP

_MM = torch.ops.aten.mm.default


@dataclasses.dataclass(frozen=True)
class LayerCheckpointPolicy:
    """The resolved policy shared by every checkpointed layer of a model.

    One instance serves all layers, so the compiled graph's guards on it hold for every
    layer and one graph is reused.

    Attributes:
        mode: ``"full"``, ``"selective"`` or ``"memory_budget"``.
        saved_ops: Selective: ops (overloads or packets) whose outputs are saved.
        save_every_other_matmul: Selective: alternate save/recompute over ``aten.mm``.
        memory_budget: Budget for ``"memory_budget"``.
    """

    mode: str
    saved_ops: tuple[Any, ...] = ()
    save_every_other_matmul: bool = False
    memory_budget: float = 1.0

    @classmethod
    def from_config(cls, section: ActivationCheckpointingSection) -> "LayerCheckpointPolicy":
        """Builds the policy of an ``[activation_checkpointing]`` section (mode not none)."""
        assert section.mode != "none", "mode 'none' has no layer policy"
        return cls(
            mode=section.mode,
            saved_ops=tuple(resolve_op(name) for name in section.saved_ops),
            save_every_other_matmul=section.save_every_other_matmul,
            memory_budget=section.memory_budget,
        )


class _SelectiveOpPolicy:
    """Per-call SAC decision function; counts matmuls for the every-other variant.

    A fresh instance serves each checkpointed call, so the matmul parity restarts at
    every layer, and forward and recompute keep separate counts (they must agree on
    which matmul was saved).
    """

    def __init__(self, policy: LayerCheckpointPolicy):
        self._saved_ops = policy.saved_ops
        self._every_other = policy.save_every_other_matmul
        self._num_matmuls = {False: 0, True: 0}

    def __call__(self, ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func == KV_ALL_GATHER_OP:
            # A collective: repeating it in recompute would cost a second all-gather.
            return CheckpointPolicy.MUST_SAVE
        if func == _MM and self._every_other:
            self._num_matmuls[ctx.is_recompute] += 1
            save = self._num_matmuls[ctx.is_recompute] % 2 == 1
        else:
            # Higher-order ops (FlexAttention) have no overload packet.
            packet = getattr(func, "overloadpacket", None)
            save = func in self._saved_ops or packet in self._saved_ops
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts(policy: LayerCheckpointPolicy):
    return create_selective_checkpoint_contexts(_SelectiveOpPolicy(policy))


class CheckpointedQwen3DenseLayer(Qwen3DenseLayer):
    """A ``Qwen3DenseLayer`` whose forward applies ``checkpoint_policy``.

    Never constructed directly: :func:`apply_activation_checkpointing` switches the
    class of existing layers, so their parameters and names are unchanged.

    Attributes:
        checkpoint_policy: The policy, shared by all layers of the model.
    """

    checkpoint_policy: LayerCheckpointPolicy

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """Runs ``Qwen3DenseLayer.forward`` under the checkpoint policy."""
        policy = self.checkpoint_policy
        layer_forward = super().forward
        args = (hidden_states, position_embeddings, attention_mask)
        if policy.mode == "memory_budget":
            with torch.autograd.graph.region_activation_memory_budget(policy.memory_budget):
                return layer_forward(*args)
        if policy.mode == "selective":
            return checkpoint(
                layer_forward,
                *args,
                use_reentrant=False,
                context_fn=functools.partial(_selective_contexts, policy),
            )
        return checkpoint(layer_forward, *args, use_reentrant=False)


def _compiling_a_checkpointed_layer() -> bool:
    # The compile of a layer runs inside that layer's call: one of the frames below is
    # a method of the layer (``Module._wrapped_call_impl``) with the layer as ``self``.
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), CheckpointedQwen3DenseLayer):
            return True
        frame = frame.f_back
    return False


def _quiet_context_fn_warning() -> None:
    # torch.compile warns once per process that a checkpoint with ``context_fn`` (the
    # selective policy) must not contain in-place ops. The layer's forward has none (it
    # is the model's plain, out-of-place code), so for these layers the warning says
    # nothing. It is dropped only while one of them compiles; torch emits it once per
    # process, so a user's own region still gets it if it compiles first.
    install_log_filter(
        "torch._higher_order_ops.wrap",
        r"Detected that context_fn is passed to torch.utils.checkpoint under torch.compile",
        when=_compiling_a_checkpointed_layer,
    )


def apply_activation_checkpointing(
    layers: list[Qwen3DenseLayer], section: ActivationCheckpointingSection
) -> LayerCheckpointPolicy | None:
    """Applies the checkpoint policy of ``section`` to every layer, in place.

    Args:
        layers: The model's ``Qwen3DenseLayer`` modules.
        section: The ``[activation_checkpointing]`` config; mode ``"none"`` does nothing.

    Returns:
        The shared policy, or ``None`` for mode ``"none"``.
    """
    if section.mode == "none":
        return None
    policy = LayerCheckpointPolicy.from_config(section)
    if section.mode == "selective":
        _quiet_context_fn_warning()
    for layer in layers:
        if type(layer) is not Qwen3DenseLayer:
            raise ValueError(
                f"activation checkpointing expects plain Qwen3DenseLayer modules, "
                f"got {type(layer).__name__}"
            )
        layer.__class__ = CheckpointedQwen3DenseLayer
        layer.checkpoint_policy = policy
    return policy
