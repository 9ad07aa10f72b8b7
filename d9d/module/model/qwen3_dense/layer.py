"""One Qwen3 Dense transformer layer."""

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from d9d.module.block.attention import GroupedQueryAttention
from d9d.module.block.norm import RMSNorm
from d9d.module.block.swiglu import SwiGLU
from d9d.module.model.qwen3_dense.params import Qwen3DenseLayerParameters


class Qwen3DenseLayer(nn.Module):
    """Implements a single Qwen3 Dense transformer layer.

    This layer consists of a Grouped Query Attention mechanism followed by a SwiGLU MLP
    block, with pre-RMSNorm applied before each sub-layer. It is the unit of regional
    compilation, activation checkpointing and FSDP sharding, so its forward has no
    data-dependent Python control flow.

    Attributes:
        checkpoint_policy: The activation-checkpoint policy the layer runs under (set by
            ``d9d.compile``'s activation checkpointing; ``None``: none).
        is_compiled: Whether ``d9d.compile`` compiled the layer (regional compile).
    """

    # What the compile layer did to this layer, readable by the later steps of the stack
    # (tensor parallelism refuses combinations torch cannot compile).
    checkpoint_policy = None
    is_compiled: bool = False

    def __init__(self, params: Qwen3DenseLayerParameters):
        """Constructs a Qwen3DenseLayer object.

        Args:
            params: Configuration parameters for the layer.
        """
        super().__init__()
        self.input_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        self.self_attn = GroupedQueryAttention(
            hidden_size=params.hidden_size,
            num_attention_heads=params.num_attention_heads,
            num_key_value_heads=params.num_key_value_heads,
            head_dim=params.head_dim,
            rms_norm_eps=params.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        self.mlp = SwiGLU(params.hidden_size, params.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """Performs the forward pass of the dense layer.

        Args:
            hidden_states: Input tensor of shape (batch, seq_len, hidden_dim).
            position_embeddings: Tuple containing RoPE precomputed embeddings (cos, sin).
            attention_mask: Document mask of packed rows (built once per stage forward and
                shared by all layers), or ``None`` for plain causal attention.

        Returns:
            Output tensor after attention and MLP blocks, shape (batch, seq_len, hidden_dim).
        """
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def reset_parameters(self) -> None:
        """Resets module parameters."""
        self.input_layernorm.reset_parameters()
        self.self_attn.reset_parameters()
        self.post_attention_layernorm.reset_parameters()
        self.mlp.reset_parameters()
