"""Shared fixtures: small model parameters that every test file can build on."""

import pytest
import torch

from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)


def small_model_params(
    num_hidden_layers: int = 4,
    split_vocab_size: dict[str, int] | None = None,
    split_vocab_order: list[str] | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    max_position_ids: int = 128,
    **extra,
) -> Qwen3DenseParameters:
    """A tiny backbone; by default two vocab splits in non-alphabetical order."""
    if split_vocab_size is None:
        split_vocab_size = {"text": 80, "special": 16}
        split_vocab_order = ["text", "special"]
    return Qwen3DenseParameters(
        layer=Qwen3DenseLayerParameters(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            rms_norm_eps=1e-6,
            head_dim=head_dim,
        ),
        num_hidden_layers=num_hidden_layers,
        rope_base=10000,
        max_position_ids=max_position_ids,
        split_vocab_size=split_vocab_size,
        split_vocab_order=split_vocab_order or list(split_vocab_size),
        **extra,
    )


def small_causal_lm_params(**kwargs) -> Qwen3DenseForCausalLMParameters:
    return Qwen3DenseForCausalLMParameters(model=small_model_params(**kwargs))


def small_classification_params(
    num_labels: int = 3, **kwargs
) -> Qwen3DenseForClassificationParameters:
    return Qwen3DenseForClassificationParameters(
        model=small_model_params(**kwargs), num_labels=num_labels, classifier_dropout=0.0
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
