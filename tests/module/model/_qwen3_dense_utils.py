"""Helpers shared by the Qwen3 Dense model, parity and pipeline tests."""

import torch
from torch import nn
from transformers import Qwen3Config

from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import Qwen3DenseParameters
from d9d.pipelining.api import PipelineStageInfo


@torch.no_grad()
def randomize_(module: nn.Module) -> nn.Module:
    """Gives every parameter an O(1)-signal random value, in place.

    Norm weights become U(0.5, 1.5): at their init value of 1 a norm applied at the wrong
    place (e.g. q/k-norm after RoPE) would go unnoticed. Linear weights get std
    ``fan_in ** -0.5`` (HF's 0.02 would make attention almost uniform and hide RoPE,
    masking and scaling bugs); embeddings get N(0, 1).
    """
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            param.uniform_(0.5, 1.5)
        elif "embed" in name:
            param.normal_(0.0, 1.0)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5)
    return module


def build(
    cls,
    params,
    stage: PipelineStageInfo | None = None,
    mode: HiddenStatesAggregationMode | str = HiddenStatesAggregationMode.no,
    enable_checkpointing: bool = False,
):
    """Builds ``cls`` (a Qwen3 Dense model class) for ``stage`` (one stage by default)."""
    return cls(
        params=params,
        stage=stage or PipelineStageInfo(0, 1),
        hidden_states_snapshot_mode=HiddenStatesAggregationMode(mode),
        enable_checkpointing=enable_checkpointing,
    )


def random_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    """Random token ids that include the first and the last id of the vocabulary."""
    ids = torch.randint(0, vocab_size, (batch, seq))
    ids[0, 0] = vocab_size - 1
    ids[-1, -1] = 0
    return ids


def load_stage_from_full(stage_module: nn.Module, full_module: nn.Module) -> None:
    """Copies the weights of ``stage_module`` from the one-stage model, matched by name."""
    full = full_module.state_dict()
    stage_module.load_state_dict({key: full[key] for key in stage_module.state_dict()})


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def hf_config(params: Qwen3DenseParameters, attn_implementation: str, **extra) -> Qwen3Config:
    """The HF config of the same architecture (untied embeddings, no dropout)."""
    layer = params.layer
    return Qwen3Config(
        vocab_size=params.vocab_size,
        hidden_size=layer.hidden_size,
        intermediate_size=layer.intermediate_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=layer.num_attention_heads,
        num_key_value_heads=layer.num_key_value_heads,
        head_dim=layer.head_dim,
        rms_norm_eps=layer.rms_norm_eps,
        max_position_embeddings=params.max_position_ids,
        rope_parameters={"rope_type": "default", "rope_theta": float(params.rope_base)},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        attn_implementation=attn_implementation,
        **extra,
    )
