"""Parameter validation: bad values fail at construction, naming the field."""

import pytest
from pydantic import ValidationError

from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)
from tests.helpers import small_model_params

LAYER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "head_dim": 16,
}


def model_kwargs(**overrides):
    kwargs = {
        "layer": LAYER,
        "num_hidden_layers": 2,
        "rope_base": 10000,
        "max_position_ids": 32,
        "split_vocab_size": {"text": 80, "special": 16},
        "split_vocab_order": ["text", "special"],
    }
    kwargs.update(overrides)
    return kwargs


def test_valid_parameters_and_defaults():
    params = Qwen3DenseParameters(**model_kwargs())
    assert params.pipeline_num_virtual_layers_pre == 0
    assert params.pipeline_num_virtual_layers_post == 0
    assert params.vocab_size == 96
    assert isinstance(params.layer, Qwen3DenseLayerParameters)
    assert Qwen3DenseForCausalLMParameters(model=params).model == params
    cls = Qwen3DenseForClassificationParameters(model=params, num_labels=2, classifier_dropout=0.1)
    assert cls.classifier_dropout == 0.1
    # A JSON round trip keeps everything.
    assert Qwen3DenseParameters.model_validate_json(params.model_dump_json()) == params


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("hidden_size", -64),
        ("intermediate_size", 0),
        ("num_attention_heads", 0),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", -2),
        ("head_dim", 0),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", -1e-6),
        ("hidden_size", "wide"),
    ],
)
def test_layer_rejects_non_positive_sizes_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        Qwen3DenseLayerParameters(**{**LAYER, field: value})


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 3), (6, 4), (2, 4)])
def test_layer_rejects_query_heads_not_divisible_by_kv_heads(heads, kv_heads):
    with pytest.raises(ValidationError, match="num_key_value_heads") as info:
        Qwen3DenseLayerParameters(
            **{**LAYER, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
        )
    assert "num_attention_heads" in str(info.value)


def test_layer_rejects_odd_head_dim():
    with pytest.raises(ValidationError, match="head_dim"):
        Qwen3DenseLayerParameters(**{**LAYER, "head_dim": 15})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 0),
        ("rope_base", 0),
        ("max_position_ids", 0),
        ("max_position_ids", -1),
        ("pipeline_num_virtual_layers_pre", -1),
        ("pipeline_num_virtual_layers_post", -2),
        ("split_vocab_size", {"text": 0, "special": 16}),
        ("split_vocab_size", {"text": -3, "special": 16}),
    ],
)
def test_model_rejects_bad_sizes_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        Qwen3DenseParameters(**model_kwargs(**{field: value}))


@pytest.mark.parametrize(
    "order",
    [
        ["text"],  # a split missing
        ["text", "special", "extra"],  # an unknown split
        ["text", "text"],  # a duplicate
        ["text", "special", "text"],  # a duplicate with every key present
        [],
    ],
)
def test_split_vocab_order_must_be_a_permutation_of_split_keys(order):
    with pytest.raises(ValidationError, match="split_vocab_order"):
        Qwen3DenseParameters(**model_kwargs(split_vocab_order=order))


def test_split_vocab_order_can_be_any_permutation():
    params = Qwen3DenseParameters(**model_kwargs(split_vocab_order=["special", "text"]))
    assert params.split_vocab_order == ["special", "text"]


def test_empty_vocabulary_is_rejected():
    with pytest.raises(ValidationError, match="split_vocab_size"):
        Qwen3DenseParameters(**model_kwargs(split_vocab_size={}, split_vocab_order=[]))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Qwen3DenseLayerParameters(**LAYER, hidden_act="silu"), "hidden_act"),
        (lambda: Qwen3DenseParameters(**model_kwargs(vocab_size=96)), "vocab_size"),
        (
            lambda: Qwen3DenseForCausalLMParameters(model=small_model_params(), tie=True),
            "tie",
        ),
        (
            lambda: Qwen3DenseForClassificationParameters(
                model=small_model_params(), num_labels=2, classifier_dropout=0.0, pooling="last"
            ),
            "pooling",
        ),
        (
            lambda: Qwen3DenseParameters(**model_kwargs(layer={**LAYER, "typo_size": 1})),
            "typo_size",
        ),
    ],
)
def test_unknown_fields_are_rejected_by_name(build, field):
    with pytest.raises(ValidationError, match=field):
        build()


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), "high"])
def test_classifier_dropout_must_be_a_probability_below_one(dropout):
    with pytest.raises(ValidationError, match="classifier_dropout"):
        Qwen3DenseForClassificationParameters(
            model=small_model_params(), num_labels=2, classifier_dropout=dropout
        )


@pytest.mark.parametrize("num_labels", [0, -1])
def test_num_labels_must_be_positive(num_labels):
    with pytest.raises(ValidationError, match="num_labels"):
        Qwen3DenseForClassificationParameters(
            model=small_model_params(), num_labels=num_labels, classifier_dropout=0.0
        )


def test_validation_errors_are_value_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        Qwen3DenseLayerParameters(**{**LAYER, "hidden_size": 0})
