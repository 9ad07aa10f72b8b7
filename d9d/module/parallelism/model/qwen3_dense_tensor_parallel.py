"""Tensor parallelism with sequence parallelism for Qwen3 Dense: where the TP plans live.

On the ``tp`` dim of the dense mesh, per pipeline stage:

* token embedding (first stage): every vocabulary split sharded by rows; the lookup's
  partial sums are reduce-scattered onto the sequence dimension;
* residual stream: a ``DTensor`` sharded on the sequence dimension (``Shard(1)``)
  between and inside the layers, so the RMSNorms run sequence-parallel on ``S / tp``
  tokens per rank;
* each layer: the attention and MLP inputs are all-gathered once; q/k/v and gate/up are
  column-wise (each rank holds ``heads / tp`` query and ``kv_heads / tp`` key/value heads,
  ``intermediate / tp`` MLP columns) and return plain local tensors, so the q/k norms,
  RoPE and ``scaled_dot_product_attention`` run on the local heads (torch has no DTensor
  sharding rule for SDPA on the CPU); o and down are row-wise and reduce-scatter back onto
  the sequence dimension;
* final norm (last stage): sequence-parallel; the stage's ``hidden_states`` output is
  then all-gathered into a plain tensor, the same on every rank;
* LM head: every split sharded by rows (vocabulary); the loss reduces the max,
  logsumexp and label pick over the group, chunk by chunk, so no rank ever holds
  full-vocabulary logits (see ``d9d.module.block.chunked_nll``); ``logps`` is complete
  on every rank;
* hidden-state snapshots: each layer output is gathered before its masked mean, so
  the snapshot is whole on every rank;
* classification head: replicated (``num_labels`` is small); it scores the gathered
  hidden states on every rank, so ``scores`` and its gradients are complete everywhere.

Between pipeline stages the hidden states travel whole (plain tensors, the same on every
TP rank): the receiving stage takes its sequence shard without communication.

Float8 linears use torchao's float8 tensor-parallel styles, which need CUDA; on the CPU a
float8 preset under tensor parallelism is refused.
"""

import inspect

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from d9d.core.dist_context import DENSE_DOMAIN, DistributedContext
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseModel
from d9d.module.model.qwen3_dense.model import backbone_of
from d9d.module.parallelism.tensor_parallel import (
    ReplicateFirstInput,
    VocabParallelEmbedding,
    VocabParallelWeights,
    full_local,
)
from d9d.pipelining.api import PipelineStageInfo


def _backbone(model: nn.Module) -> Qwen3DenseModel:
    return backbone_of(model, "tensor parallelism")


def validate_tensor_parallel(model: nn.Module, tensor_parallel: int) -> None:
    """Raises ``ValueError`` unless ``model``'s shapes split evenly over ``tensor_parallel``.

    Checks the query heads, key/value heads, MLP intermediate size and every vocabulary
    split. Runs before any communication.

    Args:
        model: A Qwen3 Dense model or stage (its parameters, not its device, matter).
        tensor_parallel: The tensor-parallel degree.
    """
    backbone = _backbone(model)
    params = backbone.params
    layer = params.layer
    sizes = {
        "num_attention_heads": layer.num_attention_heads,
        "num_key_value_heads": layer.num_key_value_heads,
        "intermediate_size": layer.intermediate_size,
    }
    for name in params.split_vocab_order:
        sizes[f"split_vocab_size[{name!r}]"] = params.split_vocab_size[name]
    for what, value in sizes.items():
        if value % tensor_parallel:
            raise ValueError(
                f"{what}={value} is not divisible by tensor_parallel={tensor_parallel} "
                "(tensor parallelism splits it evenly across the tensor-parallel ranks)"
            )


def check_checkpointing_for_tensor_parallel(
    mode: str, compiled: bool, tensor_parallel: int, what: str
) -> None:
    """Raises ``ValueError`` for checkpoint modes that cannot compile under tensor parallelism.

    On torch 2.13, a compiled layer holding DTensor collectives fails with two
    checkpoint modes: ``"full"`` (AOTAutograd saves the ``DeviceMesh`` among the
    tensors kept for backward and asserts "expected all tensors_saved_with_vc_check to
    be Tensors") and ``"memory_budget"`` (the min-cut partitioner "cannot compute the
    size of FakeScriptObject", the mesh). Eager ``"full"`` and the ``"selective"`` modes
    work.

    Args:
        mode: The activation-checkpoint mode (``"none"``, ``"full"``, ...).
        compiled: Whether the layers are compiled.
        tensor_parallel: The tensor-parallel degree (nothing is refused at 1).
        what: Names the setting in the message (e.g. ``"compile config 'x'"``).
    """
    if tensor_parallel > 1 and compiled and mode in ("full", "memory_budget"):
        raise ValueError(
            f"{what}: activation_checkpointing.mode={mode!r} with "
            f"compile does not work under tensor parallelism (tensor_parallel="
            f"{tensor_parallel}) on torch {torch.__version__}: the compiled checkpoint cannot "
            "save or size the DeviceMesh of the DTensor collectives. Use a 'selective' "
            "preset (compile_sac, compile_sac_all_mm) or compile without checkpointing"
        )


def _is_float8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"


def _check_float8(layer: nn.Module, device: torch.device) -> None:
    float8 = [name for name, m in layer.named_modules() if _is_float8(m)]
    if float8 and device.type != "cuda":
        raise ValueError(
            f"float8 linears ({', '.join(float8[:3])}, ...) under tensor parallelism need "
            f"torchao's float8 tensor-parallel styles, which run on CUDA only (device is "
            f"{device.type!r}); use a compile preset without float8, or tensor_parallel=1"
        )


def _linear_style(linear: nn.Module, rowwise: bool, **kwargs) -> ParallelStyle:
    """Column/row-wise style for one linear: torchao's float8-aware one for float8 linears."""
    if not _is_float8(linear):
        return RowwiseParallel(**kwargs) if rowwise else ColwiseParallel(**kwargs)
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
    )

    return Float8RowwiseParallel(**kwargs) if rowwise else Float8ColwiseParallel(**kwargs)


def _layer_plan(layer: nn.Module) -> dict[str, ParallelStyle]:
    def colwise(name: str) -> ParallelStyle:
        return _linear_style(layer.get_submodule(name), rowwise=False)

    def rowwise(name: str) -> ParallelStyle:
        return _linear_style(
            layer.get_submodule(name), rowwise=True, output_layouts=Shard(1), use_local_output=False
        )

    return {
        "input_layernorm": SequenceParallel(),
        "self_attn": ReplicateFirstInput(),
        "self_attn.q_proj": colwise("self_attn.q_proj"),
        "self_attn.k_proj": colwise("self_attn.k_proj"),
        "self_attn.v_proj": colwise("self_attn.v_proj"),
        # The q/k norms see (B, S, local heads, head_dim): their shared weight is
        # replicated and its gradient summed over the ranks' heads.
        "self_attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "self_attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "self_attn.o_proj": rowwise("self_attn.o_proj"),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": ReplicateFirstInput(),
        "mlp.gate_proj": colwise("mlp.gate_proj"),
        "mlp.up_proj": colwise("mlp.up_proj"),
        "mlp.down_proj": rowwise("mlp.down_proj"),
    }


def _install_stage_boundary(backbone: Qwen3DenseModel, mesh: DeviceMesh) -> None:
    """Hooks that turn the stage's plain inputs/outputs into the sharded residual stream."""
    tp = mesh.size()

    def check_seq(name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() >= 2 and tensor.shape[1] % tp:
            raise ValueError(
                f"sequence length {tensor.shape[1]} ({name}) is not divisible by "
                f"tensor_parallel={tp} (sequence parallelism splits the sequence across "
                "the tensor-parallel ranks)"
            )

    names = list(inspect.signature(backbone.forward).parameters)

    def pre_hook(_module, args, kwargs):
        # Positional inputs become keywords (input_ids, hidden_states, ...).
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        args = ()
        input_ids = kwargs.get("input_ids")
        if input_ids is not None:
            check_seq("input_ids", input_ids)
        hidden = kwargs.get("hidden_states")
        if hidden is not None and not isinstance(hidden, DTensor):
            check_seq("hidden_states", hidden)
            # Every TP rank received the whole hidden states: keep this rank's sequence
            # shard (no communication; the backward all-gathers the gradient).
            whole = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
            kwargs = {**kwargs, "hidden_states": whole.redistribute(mesh, [Shard(1)])}
        return args, kwargs

    def post_hook(_module, _args, _kwargs, output):
        output["hidden_states"] = full_local(output["hidden_states"])
        return output

    backbone.register_forward_pre_hook(pre_hook, with_kwargs=True)
    backbone.register_forward_hook(post_hook, with_kwargs=True)


def apply_tensor_parallel_qwen3_dense(
    dist_context: DistributedContext, model: nn.Module, stage: PipelineStageInfo
) -> bool:
    """Applies the tensor/sequence-parallel plan to a Qwen3 Dense model or stage, in place.

    Works on a model built on ``meta`` (call ``to_empty`` + ``reset_parameters()`` or
    load a checkpoint afterwards) and keeps every parameter name. Apply it after float8
    and before activation checkpointing and compile (``d9d.stack.build_stage_modules``
    does); ``parallelize_qwen3_dense_*`` apply it followed by FSDP2 (the manual order,
    after a compile preset).

    Args:
        dist_context: The distributed context (its ``tp`` dim decides the degree).
        model: ``Qwen3DenseModel``, ``Qwen3DenseForCausalLM`` or
            ``Qwen3DenseForClassification``.
        stage: The pipeline stage ``model`` holds.

    Returns:
        Whether a plan was applied (``False`` for ``tensor_parallel=1``).

    Raises:
        ValueError: If a dimension is not divisible by the degree (see
            :func:`validate_tensor_parallel`), the model is already tensor-parallel, or
            its layers were compiled with a checkpoint mode that cannot compile under
            tensor parallelism.
    """
    degree = dist_context.params.tensor_parallel
    if degree == 1:
        return False
    validate_tensor_parallel(model, degree)
    backbone = _backbone(model)
    if any(isinstance(param, DTensor) for param in model.parameters()):
        raise ValueError(
            "the model's parameters are already DTensors: tensor parallelism (or FSDP2) was "
            "applied to it before; apply tensor parallelism once, before FSDP2"
        )
    layers = list(backbone.layers.values())
    if layers:
        # A compile preset applied first (the manual order) left its marks on the layers;
        # the TP hooks would be traced inside them at the first call.
        policy = layers[0].checkpoint_policy
        check_checkpointing_for_tensor_parallel(
            policy.mode if policy is not None else "none",
            layers[0].is_compiled,
            degree,
            "the compile preset applied to this model",
        )
    for layer in layers:
        _check_float8(layer, dist_context.device)
    mesh = dist_context.mesh_for(DENSE_DOMAIN)["tp"]
    if stage.is_current_stage_first:
        parallelize_module(backbone.embed_tokens, mesh, VocabParallelEmbedding())
    for layer in layers:
        parallelize_module(layer, mesh, _layer_plan(layer))
    if stage.is_current_stage_last:
        parallelize_module(backbone.norm, mesh, SequenceParallel())
        if isinstance(model, Qwen3DenseForCausalLM):
            parallelize_module(model.lm_head, mesh, VocabParallelWeights())
    _install_stage_boundary(backbone, mesh)
    return True
