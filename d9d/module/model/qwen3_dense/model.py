"""The Qwen3 Dense backbone and its causal-LM and classification wrappers."""

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from d9d.core.checks import value_checks_enabled
from d9d.module.block.document_mask import (
    AttentionBackend,
    additive_mask,
    build_document_mask,
    resolve_attention_backend,
)
from d9d.module.block.embedding import SplitTokenEmbeddings
from d9d.module.block.head import ClassificationHead, SplitLanguageModellingHead
from d9d.module.block.hidden_states_aggregator import (
    HiddenStatesAggregationMode,
    create_hidden_states_aggregator,
)
from d9d.module.block.norm import RMSNorm
from d9d.module.block.position_ids import any_packed_row, check_position_ids
from d9d.module.block.rope import RotaryEmbeddingProvider
from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer
from d9d.module.model.qwen3_dense.params import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseParameters,
)
from d9d.pipelining.api import PipelineStageInfo, distribute_layers_for_pipeline_stage

if TYPE_CHECKING:
    from d9d.module.parallelism.context_parallel import ContextParallelGroup


class Qwen3DenseModel(nn.Module):
    """The Qwen3 Dense Transformer Decoder backbone.

    It is designed to be split across multiple pipeline stages: the first stage holds
    ``embed_tokens``, the last holds ``norm``, and ``layers`` is an ``nn.ModuleDict``
    keyed by global layer index.
    """

    def __init__(
        self,
        params: Qwen3DenseParameters,
        stage: PipelineStageInfo,
        hidden_states_snapshot_mode: HiddenStatesAggregationMode,
        enable_checkpointing: bool,
    ):
        """Constructs the Qwen3DenseModel object.

        Args:
            params: Configuration parameters for the full model.
            stage: Information about the pipeline stage this instance belongs to.
            hidden_states_snapshot_mode: Configures intermediate hidden state aggregation
                & snapshotting mode.
            enable_checkpointing: If True, enables activation checkpointing for transformer
                layers to save memory.
        """
        super().__init__()
        self.params = params
        self.stage = stage
        self.hidden_states_snapshot_mode = HiddenStatesAggregationMode(hidden_states_snapshot_mode)
        self.enable_checkpointing = enable_checkpointing
        self.attention_backend = AttentionBackend.auto
        # Set by d9d.module.parallelism.model.qwen3_dense_context_parallel: this stage then
        # holds a head-tail shard of every row and its layers gather K/V over the group.
        self.context_parallel: ContextParallelGroup | None = None
        layer_params = params.layer
        start, end = distribute_layers_for_pipeline_stage(
            params.num_hidden_layers,
            params.pipeline_num_virtual_layers_pre,
            params.pipeline_num_virtual_layers_post,
            stage,
        )
        self.layer_start = start
        self._compute_dtype: torch.dtype | None = None
        if stage.is_current_stage_first:
            self.embed_tokens = SplitTokenEmbeddings(
                params.split_vocab_size, params.split_vocab_order, layer_params.hidden_size
            )
        self.rotary_emb = RotaryEmbeddingProvider(
            layer_params.head_dim, params.rope_base, params.max_position_ids
        )
        self.layers = nn.ModuleDict(
            {str(i): Qwen3DenseLayer(layer_params) for i in range(start, end)}
        )
        if stage.is_current_stage_last:
            self.norm = RMSNorm(layer_params.hidden_size, layer_params.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_states_snapshot: torch.Tensor | None = None,
        hidden_states_agg_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Executes the forward pass for the current pipeline stage.

        Args:
            input_ids: Indices of input sequence tokens. Required if this is the first
                pipeline stage.
            hidden_states: Hidden states from the previous pipeline stage. Required if this
                is not the first pipeline stage.
            position_ids: Indices of positions of each input sequence tokens in the position
                embeddings. A row may pack several documents: one starts at every token
                whose position is not the previous token's + 1, and attends only to its
                own document (see ``set_attention_backend``).
            hidden_states_snapshot: Accumulated tensor of aggregated hidden states from
                previous stages. Used if snapshotting is enabled.
            hidden_states_agg_mask: Mask used to aggregate hidden states for snapshots.

        Returns:
            A dictionary containing:
            * 'hidden_states': The output of the last layer in this stage.
            * 'hidden_states_snapshot': (Optional) The updated snapshot tensor.
        """
        cp = self.context_parallel
        local = input_ids if self.stage.is_current_stage_first else hidden_states
        if cp is not None and isinstance(local, torch.Tensor) and local.dim() >= 2:
            cp.check_local_seq_len(local.shape[1])  # before any collective
        aggregator = create_hidden_states_aggregator(
            self.hidden_states_snapshot_mode,
            hidden_states_agg_mask,
            cp.sum_over_ranks if cp is not None else None,
        )
        if self.stage.is_current_stage_first:
            if input_ids is None:
                raise ValueError("input_ids is required on the first pipeline stage")
            check_batch_shape(input_ids, "input_ids")
            hidden_states = self.embed_tokens(input_ids)
            aggregator.add_hidden_states(hidden_states)
        elif hidden_states is None:
            raise ValueError(
                f"hidden_states is required on pipeline stage {self.stage.current_stage} "
                "(only the first stage takes input_ids)"
            )
        else:
            check_batch_shape(hidden_states, "hidden_states", trailing_dims=1)
        batch, seq = hidden_states.shape[:2]
        position_embeddings, attention_mask = self._position_embeddings(
            position_ids, batch, seq, hidden_states
        )
        for layer in self.layers.values():
            if self.enable_checkpointing:
                hidden_states = checkpoint(
                    layer, hidden_states, position_embeddings, attention_mask, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, position_embeddings, attention_mask)
            aggregator.add_hidden_states(hidden_states)
        if self.stage.is_current_stage_last:
            hidden_states = self.norm(hidden_states)
        return {
            "hidden_states": hidden_states,
            "hidden_states_snapshot": aggregator.pack_with_snapshot(hidden_states_snapshot),
        }

    def _position_embeddings(
        self, position_ids: torch.Tensor | None, batch: int, seq: int, like: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | BlockMask | None]:
        """RoPE ``(cos, sin)`` and the document mask shared by every layer of this stage.

        ``position_ids=None`` costs no host sync; given ``position_ids`` cost one host sync
        (their range, unless the batch was validated once per step, and whether any row
        packs several documents). Only packed batches get a mask; otherwise the layers
        run plain causal attention.

        Under context parallelism the positions are the global ones of this rank's tokens
        (from the head-tail layout when ``None``) and the mask, always built, covers the
        local queries over the keys of the whole group.
        """
        max_pos = self.params.max_position_ids
        attention_mask = None
        cp = self.context_parallel
        if cp is not None:
            if position_ids is None and seq * cp.size > max_pos:
                raise ValueError(
                    f"sequence length {seq * cp.size} ({seq} per context-parallel rank) "
                    f"exceeds max_position_ids={max_pos}"
                )
            if position_ids is not None:
                check_position_ids(
                    position_ids, batch, seq, max_pos, check_values=value_checks_enabled()
                )
            attention_mask = cp.attention_mask(
                position_ids, batch, seq, like.device, self.attention_backend
            )
            position_ids = cp.local_position_ids(position_ids, batch, seq, like.device)
        elif position_ids is None:
            if seq > max_pos:
                raise ValueError(f"sequence length {seq} exceeds max_position_ids={max_pos}")
            position_ids = torch.arange(seq, device=like.device).unsqueeze(0).expand(batch, seq)
        else:
            # Inside inputs_prevalidated() the batch's values were checked once per step;
            # whether a row is packed still takes one small sync per stage forward.
            packed = check_position_ids(
                position_ids, batch, seq, max_pos, check_values=value_checks_enabled()
            )
            if packed is None:
                packed = any_packed_row(position_ids)
            if packed:
                attention_mask = build_document_mask(position_ids, self.attention_backend)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            # One additive mask for every layer (SDPA would convert it in each).
            attention_mask = additive_mask(attention_mask, like.dtype)
        cos, sin = self.rotary_emb(position_ids)
        return (cos.to(like.dtype), sin.to(like.dtype)), attention_mask

    def set_attention_backend(self, backend: AttentionBackend | str) -> None:
        """Chooses the kernel for packed rows: ``"auto"``, ``"sdpa"`` or ``"flex"``.

        ``auto`` picks FlexAttention on CUDA and SDPA with a boolean mask elsewhere.
        Unpacked rows always run plain causal SDPA.

        Raises:
            ValueError: If ``backend`` is not one of the three.
        """
        resolve_attention_backend(backend, torch.device("cpu"))  # validates the name
        self.attention_backend = AttentionBackend(backend)

    def output_dtype(self) -> torch.dtype:
        """Returns the data type of the model output hidden states."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        return next(self.parameters()).dtype

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Declares the dtype this stage computes in, when it differs from its parameters'.

        Under FSDP2 mixed precision (e.g. fp32 parameters, bf16 compute) activations leave
        the stage in the compute dtype; pipeline metadata (``output_dtype``,
        ``infer_stage_*``) must say so. ``d9d.stack.build_stage_modules`` calls this;
        ``None`` goes back to the parameter dtype.
        """
        self._compute_dtype = dtype

    def reset_parameters(self) -> None:
        """Resets module parameters."""
        if self.stage.is_current_stage_first:
            self.embed_tokens.reset_parameters()
        self.rotary_emb.reset_parameters()
        for layer in self.layers.values():
            layer.reset_parameters()
        if self.stage.is_current_stage_last:
            self.norm.reset_parameters()

    def _num_snapshot_rows_before(self) -> int:
        # Embedding output plus every layer of the previous stages.
        return 1 + self.layer_start

    def infer_stage_inputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns meta tensors shaped like this stage's inputs for one microbatch.

        Args:
            inputs: The full-batch pipeline inputs (at least ``input_ids``).
            n_microbatches: Number of microbatches the batch is split into.
        """
        batch, seq = _microbatch_shape(inputs, n_microbatches)
        if self.stage.is_current_stage_first:
            return {"input_ids": torch.empty(batch, seq, dtype=torch.long, device="meta")}
        hidden = self.params.layer.hidden_size
        out = {
            "hidden_states": torch.empty(
                batch, seq, hidden, dtype=self.output_dtype(), device="meta"
            )
        }
        if self.hidden_states_snapshot_mode is HiddenStatesAggregationMode.mean:
            out["hidden_states_snapshot"] = torch.empty(
                self._num_snapshot_rows_before(),
                batch,
                hidden,
                dtype=self.output_dtype(),
                device="meta",
            )
        return out

    def infer_stage_outputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns meta tensors shaped like this stage's outputs for one microbatch.

        Args:
            inputs: The full-batch pipeline inputs (at least ``input_ids``).
            n_microbatches: Number of microbatches the batch is split into.
        """
        batch, seq = _microbatch_shape(inputs, n_microbatches)
        hidden = self.params.layer.hidden_size
        out = {
            "hidden_states": torch.empty(
                batch, seq, hidden, dtype=self.output_dtype(), device="meta"
            )
        }
        if self.hidden_states_snapshot_mode is HiddenStatesAggregationMode.mean:
            rows = self._num_snapshot_rows_before() + len(self.layers)
            out["hidden_states_snapshot"] = torch.empty(
                rows, batch, hidden, dtype=self.output_dtype(), device="meta"
            )
        return out


def check_batch_shape(tensor: torch.Tensor, name: str, trailing_dims: int = 0) -> None:
    """Raises ``ValueError`` unless ``tensor`` is ``(batch, seq, ...)`` with ``seq >= 1``."""
    if tensor.dim() != 2 + trailing_dims:
        dims = "(batch, seq" + ", hidden" * trailing_dims + ")"
        raise ValueError(f"{name} must be {dims}, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] == 0:
        raise ValueError(
            f"{name} has an empty sequence (shape {tuple(tensor.shape)}): seq must be >= 1"
        )


def _microbatch_shape(inputs: dict[str, torch.Tensor], n_microbatches: int) -> tuple[int, int]:
    if "input_ids" not in inputs:
        raise ValueError("pipeline inputs must contain 'input_ids' to infer stage shapes")
    batch, seq = inputs["input_ids"].shape
    if n_microbatches < 1 or batch % n_microbatches:
        raise ValueError(f"batch size {batch} is not divisible by n_microbatches={n_microbatches}")
    return batch // n_microbatches, seq


class _Qwen3DenseWithHead(nn.Module):
    """Shared plumbing of the causal-LM and classification wrappers.

    The backbone is ``self.model``; the head (built by the subclass on the last stage)
    is the attribute named by ``_head_name``.
    """

    _head_name: str

    def __init__(
        self,
        backbone_params: Qwen3DenseParameters,
        stage: PipelineStageInfo,
        hidden_states_snapshot_mode: HiddenStatesAggregationMode,
        enable_checkpointing: bool,
    ):
        super().__init__()
        self.stage = stage
        self.model = Qwen3DenseModel(
            backbone_params, stage, hidden_states_snapshot_mode, enable_checkpointing
        )

    def set_attention_backend(self, backend: AttentionBackend | str) -> None:
        """Chooses the kernel for packed rows (see ``Qwen3DenseModel.set_attention_backend``)."""
        self.model.set_attention_backend(backend)

    def reset_parameters(self) -> None:
        """Resets module parameters."""
        self.model.reset_parameters()
        if self.stage.is_current_stage_last:
            getattr(self, self._head_name).reset_parameters()

    def infer_stage_inputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns meta tensors shaped like this stage's inputs for one microbatch."""
        return self.model.infer_stage_inputs_from_pipeline_inputs(inputs, n_microbatches)


class Qwen3DenseForCausalLM(_Qwen3DenseWithHead):
    """A Qwen3 Dense model wrapped with a Causal Language Modeling head.

    It is designed to be split across multiple pipeline stages; the head lives on the
    last stage and returns the per-token negative log-likelihood under ``"logps"``.
    """

    _head_name = "lm_head"

    def __init__(
        self,
        params: Qwen3DenseForCausalLMParameters,
        stage: PipelineStageInfo,
        hidden_states_snapshot_mode: HiddenStatesAggregationMode,
        enable_checkpointing: bool,
    ):
        """Constructs the Qwen3DenseForCausalLM object.

        Args:
            params: Full model configuration parameters.
            stage: Pipeline stage information for this instance.
            hidden_states_snapshot_mode: Configures intermediate hidden state aggregation
                & snapshotting mode.
            enable_checkpointing: Whether to enable activation checkpointing.
        """
        super().__init__(params.model, stage, hidden_states_snapshot_mode, enable_checkpointing)
        self.params = params
        if stage.is_current_stage_last:
            self.lm_head = SplitLanguageModellingHead(
                params.model.split_vocab_size,
                params.model.split_vocab_order,
                params.model.layer.hidden_size,
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_states_snapshot: torch.Tensor | None = None,
        hidden_states_agg_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Executes the model forward pass.

        If this is the last stage, it expects labels to be provided and computes the
        per-token negative log-likelihood (``"logps"``, fp32, ``(batch, seq)``, exactly 0
        where the label is -100). No shift happens inside: pass ``input_ids[:, :-1]`` with
        ``labels[:, 1:]``.

        Args:
            input_ids: Input token IDS (for Stage 0).
            hidden_states: Hidden states from previous stage (for Stage > 0).
            position_ids: Positional indices for RoPE.
            hidden_states_snapshot: Intermediate state collector.
            hidden_states_agg_mask: Mask for state aggregation.
            labels: Target tokens for loss computation (Last Stage).

        Returns:
            Dictionary containing 'hidden_states', optionally 'hidden_states_snapshot',
            and per-token 'logps' if on the last stage.
        """
        if self.stage.is_current_stage_last and labels is None:
            raise ValueError("labels are required on the last pipeline stage of a causal LM")
        out = self.model(
            input_ids=input_ids,
            hidden_states=hidden_states,
            position_ids=position_ids,
            hidden_states_snapshot=hidden_states_snapshot,
            hidden_states_agg_mask=hidden_states_agg_mask,
        )
        if self.stage.is_current_stage_last:
            out["logps"] = self.lm_head(out["hidden_states"], labels)
        return out

    def infer_stage_outputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns meta tensors shaped like this stage's outputs for one microbatch."""
        out = self.model.infer_stage_outputs_from_pipeline_inputs(inputs, n_microbatches)
        if self.stage.is_current_stage_last:
            batch, seq = _microbatch_shape(inputs, n_microbatches)
            out["logps"] = torch.empty(batch, seq, dtype=torch.float32, device="meta")
        return out


class Qwen3DenseForClassification(_Qwen3DenseWithHead):
    """A Qwen3 Dense model wrapped with a Sequence/Token Classification head.

    It is designed to be split across multiple pipeline stages; the head lives on the
    last stage and returns fp32 ``"scores"``.
    """

    _head_name = "cls_head"

    def __init__(
        self,
        params: Qwen3DenseForClassificationParameters,
        stage: PipelineStageInfo,
        hidden_states_snapshot_mode: HiddenStatesAggregationMode,
        enable_checkpointing: bool,
    ):
        """Constructs the Qwen3DenseForClassification object.

        Args:
            params: Full model configuration parameters.
            stage: Pipeline stage information for this instance.
            hidden_states_snapshot_mode: Configures intermediate hidden state aggregation
                & snapshotting mode.
            enable_checkpointing: Whether to enable activation checkpointing.
        """
        super().__init__(params.model, stage, hidden_states_snapshot_mode, enable_checkpointing)
        self.params = params
        if stage.is_current_stage_last:
            self.cls_head = ClassificationHead(
                params.model.layer.hidden_size, params.num_labels, params.classifier_dropout
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_states_snapshot: torch.Tensor | None = None,
        hidden_states_agg_mask: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Executes the classification model forward pass.

        Args:
            input_ids: Input token IDS (for Stage 0).
            hidden_states: Hidden states from previous stage (for Stage > 0).
            position_ids: Positional indices for RoPE.
            hidden_states_snapshot: Intermediate state collector.
            hidden_states_agg_mask: Mask for state aggregation.
            pooling_mask: Binary mask indicating which token(s) to pool for classification.
                Note: you can use d9d.dataset.token_pooling_mask_from_attention_mask in your
                Dataset to preallocate the pooling mask from attention mask.

        Returns:
            Dictionary containing 'hidden_states', optionally 'hidden_states_snapshot'. If
            on the last stage, also contains 'scores' (logits) of shape [batch, num_labels]
            (one pooled token per row), or [batch, seq, num_labels] without a pooling mask.
        """
        out = self.model(
            input_ids=input_ids,
            hidden_states=hidden_states,
            position_ids=position_ids,
            hidden_states_snapshot=hidden_states_snapshot,
            hidden_states_agg_mask=hidden_states_agg_mask,
        )
        if self.stage.is_current_stage_last:
            out["scores"] = self.cls_head(out["hidden_states"], pooling_mask)
        return out

    def infer_stage_outputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns meta tensors shaped like this stage's outputs for one microbatch.

        The number of scored rows follows ``inputs["pooling_mask"]`` of the first
        microbatch when it is given (one per row otherwise).
        """
        out = self.model.infer_stage_outputs_from_pipeline_inputs(inputs, n_microbatches)
        if self.stage.is_current_stage_last:
            batch, seq = _microbatch_shape(inputs, n_microbatches)
            pooling_mask = inputs.get("pooling_mask")
            num_labels = self.params.num_labels
            if pooling_mask is None:
                shape = (batch, seq, num_labels)
            elif pooling_mask.device.type == "meta":
                shape = (batch, num_labels)
            else:
                shape = (int(pooling_mask[:batch].bool().sum()), num_labels)
            out["scores"] = torch.empty(shape, dtype=torch.float32, device="meta")
        return out


def backbone_of(model: nn.Module, what: str) -> Qwen3DenseModel:
    """The ``Qwen3DenseModel`` of a Qwen3 Dense model or pipeline stage.

    Args:
        model: ``Qwen3DenseModel``, ``Qwen3DenseForCausalLM`` or
            ``Qwen3DenseForClassification``.
        what: What needs the backbone (named in the error).

    Raises:
        ValueError: For any other module type.
    """
    if isinstance(model, Qwen3DenseModel):
        return model
    if isinstance(model, Qwen3DenseForCausalLM | Qwen3DenseForClassification):
        return model.model
    raise ValueError(
        f"{what} applies to Qwen3DenseModel, Qwen3DenseForCausalLM or "
        f"Qwen3DenseForClassification, got {type(model).__name__}"
    )


def whole_model(
    params: Qwen3DenseForCausalLMParameters | Qwen3DenseForClassificationParameters,
) -> "Qwen3DenseForCausalLM | Qwen3DenseForClassification":
    """The whole model of ``params`` as one pipeline stage: no snapshots, no checkpointing.

    What the HF I/O, exports and size estimates build (on the current default device: under
    ``torch.device("meta")`` for names and shapes only).

    Args:
        params: Causal-LM or classification parameters; they choose the class.
    """
    cls = (
        Qwen3DenseForClassification
        if isinstance(params, Qwen3DenseForClassificationParameters)
        else Qwen3DenseForCausalLM
    )
    return cls(
        params,
        PipelineStageInfo(0, 1),
        hidden_states_snapshot_mode="no",
        enable_checkpointing=False,
    )
