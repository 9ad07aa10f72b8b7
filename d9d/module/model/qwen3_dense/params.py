"""Pydantic parameter models of the Qwen3 Dense family."""

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Qwen3DenseLayerParameters(_Params):
    """Configuration parameters for a single Qwen3 Dense layer.

    Attributes:
        hidden_size: Dimension of the model's hidden states.
        intermediate_size: Dimension of the feed-forward hidden state.
        num_attention_heads: Number of attention heads for the query.
        num_key_value_heads: Number of attention heads for key and value.
        rms_norm_eps: Epsilon value found in the RMSNorm layers.
        head_dim: Dimension of a single attention head.
    """

    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    rms_norm_eps: PositiveFloat
    head_dim: PositiveInt

    @model_validator(mode="after")
    def _check_heads(self) -> Self:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        return self


class Qwen3DenseParameters(_Params):
    """Configuration parameters for the Qwen3 Dense model backbone.

    Attributes:
        layer: Configuration shared across all transformer layers.
        num_hidden_layers: The total number of transformer layers.
        rope_base: Base value for RoPE frequency calculation.
        max_position_ids: Maximum sequence length.
        split_vocab_size: A dictionary mapping vocabulary segment names to their sizes.
        split_vocab_order: The sequence in which vocabulary splits are correctly ordered.
        pipeline_num_virtual_layers_pre: The number of 'virtual' layers representing the
            computational cost of modules on the first stage, before the main layers
            (e.g., token and positional embeddings).
        pipeline_num_virtual_layers_post: The number of 'virtual' layers representing the
            computational cost of modules on the last stage, after the main layers
            (e.g., the final layer normalization and LM head).
    """

    layer: Qwen3DenseLayerParameters
    num_hidden_layers: PositiveInt
    rope_base: PositiveInt
    max_position_ids: PositiveInt
    split_vocab_size: dict[str, PositiveInt]
    split_vocab_order: list[str]
    pipeline_num_virtual_layers_pre: int = Field(default=0, ge=0)
    pipeline_num_virtual_layers_post: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_vocab(self) -> Self:
        if not self.split_vocab_size:
            raise ValueError("split_vocab_size must name at least one vocabulary split")
        order, keys = self.split_vocab_order, set(self.split_vocab_size)
        if len(order) != len(set(order)) or set(order) != keys:
            raise ValueError(
                f"split_vocab_order {order} must be a permutation of the keys of "
                f"split_vocab_size {sorted(keys)}"
            )
        return self

    @property
    def vocab_size(self) -> int:
        """Total vocabulary size over all splits."""
        return sum(self.split_vocab_size.values())


class Qwen3DenseForCausalLMParameters(_Params):
    """Configuration parameters for Qwen3 Dense model with a Causal Language Modeling head.

    Attributes:
        model: The configuration for the underlying Qwen3 Dense model.
    """

    model: Qwen3DenseParameters


class Qwen3DenseForClassificationParameters(_Params):
    """Configuration parameters for Qwen3 Dense model with a token/sequence classification head.

    Attributes:
        model: The configuration for the underlying Qwen3 Dense model.
        num_labels: The number of output labels for classification.
        classifier_dropout: The dropout probability for the classification head.
    """

    model: Qwen3DenseParameters
    num_labels: PositiveInt
    classifier_dropout: float = Field(ge=0.0, lt=1.0)
