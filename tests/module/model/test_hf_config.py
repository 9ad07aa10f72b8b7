"""HF ``config.json`` <-> Qwen3 Dense parameters: conversion and refusals."""

import json

import pytest
from transformers import Qwen3Config

from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
)
from d9d.module.model.qwen3_dense.hf_config import (
    backbone_params_from_hf_config,
    causal_lm_params_from_hf_config,
    classification_params_from_hf_config,
    hf_config_from_params,
    read_hf_config,
)


def _hf_config_dict(**overrides) -> dict:
    """What transformers 5 writes to config.json for a tiny Qwen3."""
    config = Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    out = config.to_dict()
    out.update(overrides)
    return out


def test_causal_lm_params_from_transformers_5_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_dict()))
    params = causal_lm_params_from_hf_config(tmp_path)
    assert isinstance(params, Qwen3DenseForCausalLMParameters)
    backbone = params.model
    assert backbone.layer.model_dump() == {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "head_dim": 16,
    }
    assert backbone.num_hidden_layers == 3
    assert backbone.rope_base == 1_000_000
    assert backbone.max_position_ids == 256
    assert backbone.split_vocab_size == {"main": 96}
    assert backbone.split_vocab_order == ["main"]


def test_transformers_4_style_rope_theta_and_overrides():
    config = _hf_config_dict(rope_theta=500_000.0, rope_scaling=None)
    del config["rope_parameters"]
    config["num_key_value_heads"] = None  # HF: defaults to num_attention_heads
    backbone = backbone_params_from_hf_config(
        config,
        split_vocab_size={"text": 80, "special": 16},
        split_vocab_order=["special", "text"],
        max_position_ids=64,
        pipeline_num_virtual_layers_post=1,
    )
    assert backbone.rope_base == 500_000
    assert backbone.layer.num_key_value_heads == 4
    assert backbone.max_position_ids == 64
    assert backbone.split_vocab_order == ["special", "text"]
    assert backbone.pipeline_num_virtual_layers_post == 1


def test_classification_num_labels_from_id2label_or_argument():
    config = _hf_config_dict(id2label={"0": "neg", "1": "neu", "2": "pos"})
    config.pop("num_labels", None)
    params = classification_params_from_hf_config(config)
    assert isinstance(params, Qwen3DenseForClassificationParameters)
    assert params.num_labels == 3
    assert params.classifier_dropout == 0.0
    assert classification_params_from_hf_config(config, num_labels=7).num_labels == 7
    bare = _hf_config_dict()
    bare.pop("id2label", None)
    bare.pop("num_labels", None)
    with pytest.raises(ValueError, match="num_labels"):
        classification_params_from_hf_config(bare)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"model_type": "qwen3_moe"}, "model_type"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            "rope_parameters.rope_type",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "beta": 1}},
            "rope_parameters.beta",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_theta": 1e4},
            "rope_theta",
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4 + 0.5}}, "rope_theta"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"head_dim": None}, "head_dim"),
    ],
)
def test_unsupported_fields_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        causal_lm_params_from_hf_config(_hf_config_dict(**overrides))


def test_vocab_splits_must_add_up():
    with pytest.raises(ValueError, match="vocab_size"):
        backbone_params_from_hf_config(_hf_config_dict(), split_vocab_size={"a": 50, "b": 40})


def test_exported_config_round_trips_and_transformers_reads_it(tmp_path):
    params = classification_params_from_hf_config(
        _hf_config_dict(id2label={"0": "neg", "1": "pos"}, pad_token_id=5),
        split_vocab_size={"text": 80, "special": 16},
        split_vocab_order=["text", "special"],
    )
    base = _hf_config_dict(id2label={"0": "neg", "1": "pos"}, pad_token_id=5)
    exported = hf_config_from_params(params, base_config=base)
    assert exported["architectures"] == ["Qwen3ForSequenceClassification"]
    assert exported["id2label"] == {"0": "neg", "1": "pos"}
    assert exported["pad_token_id"] == 5
    assert exported["tie_word_embeddings"] is False
    (tmp_path / "config.json").write_text(json.dumps(exported))
    again = classification_params_from_hf_config(
        read_hf_config(tmp_path),
        split_vocab_size={"text": 80, "special": 16},
        split_vocab_order=["text", "special"],
    )
    assert again == params
    hf = Qwen3Config.from_pretrained(tmp_path)
    assert hf.vocab_size == 96
    assert hf.rope_parameters["rope_theta"] == 1_000_000.0
    assert hf.num_labels == 2
    assert hf.head_dim == 16


def test_published_qwen3_0_6b_config_written_by_transformers_4():
    # config.json of Qwen/Qwen3-0.6B (transformers 4.51 layout: top-level rope_theta).
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    backbone = causal_lm_params_from_hf_config(config).model
    assert (backbone.layer.hidden_size, backbone.layer.intermediate_size) == (1024, 3072)
    assert (backbone.layer.num_attention_heads, backbone.layer.num_key_value_heads) == (16, 8)
    assert (backbone.layer.head_dim, backbone.num_hidden_layers) == (128, 28)
    assert (backbone.rope_base, backbone.max_position_ids) == (1_000_000, 40960)
    assert backbone.split_vocab_size == {"main": 151936}
