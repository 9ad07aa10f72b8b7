"""Qwen3 Dense model behaviour: names, late init, checkpointing, snapshots and bad inputs."""

import math

import pytest
import torch
from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

from d9d.module.base import ModuleLateInit
from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.block.rope import RotaryEmbeddingProvider
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseLayer,
    Qwen3DenseModel,
)
from d9d.module.model.qwen3_dense.hf import state_dict_from_hf, state_dict_to_hf
from d9d.pipelining.api import ModuleSupportsPipelining, PipelineStageInfo
from tests.helpers import (
    build,
    hf_config,
    random_ids,
    randomize_,
    small_causal_lm_params,
    small_classification_params,
    small_model_params,
)

LAYER_SUFFIXES = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]


def backbone_keys(num_layers: int, splits: list[str]) -> set[str]:
    keys = {f"model.embed_tokens.token_embedding.{name}.weight" for name in splits}
    keys |= {f"model.layers.{i}.{s}" for i in range(num_layers) for s in LAYER_SUFFIXES}
    return keys | {"model.norm.weight"}


def causal_inputs(params, batch: int = 2, seq: int = 12):
    ids = random_ids(params.model.vocab_size, batch, seq + 1)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


# --- state-dict names --------------------------------------------------------------------


def test_causal_lm_state_dict_names_are_exactly_the_spec_ones():
    model = build(Qwen3DenseForCausalLM, small_causal_lm_params(num_hidden_layers=2))
    expected = backbone_keys(2, ["text", "special"])
    expected |= {"lm_head.lm_head.text.weight", "lm_head.lm_head.special.weight"}
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["model.embed_tokens.token_embedding.text.weight"].shape == (80, 64)
    assert sd["model.embed_tokens.token_embedding.special.weight"].shape == (16, 64)
    assert sd["lm_head.lm_head.special.weight"].shape == (16, 64)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.1.self_attn.q_norm.weight"].shape == (16,)


def test_classification_state_dict_names_are_exactly_the_spec_ones():
    model = build(Qwen3DenseForClassification, small_classification_params(num_hidden_layers=2))
    expected = backbone_keys(2, ["text", "special"]) | {"cls_head.score.weight"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["cls_head.score.weight"].shape == (3, 64)


@pytest.mark.parametrize(
    ("hf_cls", "ours_cls", "params_fn", "extra"),
    [
        (Qwen3ForCausalLM, Qwen3DenseForCausalLM, small_causal_lm_params, {}),
        (
            Qwen3ForSequenceClassification,
            Qwen3DenseForClassification,
            small_classification_params,
            {"num_labels": 3},
        ),
    ],
    ids=["causal_lm", "classification"],
)
def test_single_split_names_map_one_to_one_onto_hf(hf_cls, ours_cls, params_fn, extra):
    params = params_fn(num_hidden_layers=2, split_vocab_size={"all": 96})
    hf_sd = hf_cls(hf_config(params.model, "eager", **extra)).state_dict()
    ours = build(ours_cls, params).state_dict()
    assert len(ours) == len(hf_sd)
    assert set(state_dict_to_hf(ours, params.model)) == set(hf_sd)
    assert set(state_dict_from_hf(hf_sd, params.model)) == set(ours)


def test_state_dict_to_hf_round_trips_with_splits_in_order():
    params = small_causal_lm_params(num_hidden_layers=1)
    ours = randomize_(build(Qwen3DenseForCausalLM, params)).state_dict()
    hf = state_dict_to_hf(ours, params.model)
    # Rows 0..79 are the "text" split, rows 80..95 the "special" split.
    assert torch.equal(
        hf["model.embed_tokens.weight"][:80], ours["model.embed_tokens.token_embedding.text.weight"]
    )
    assert torch.equal(hf["lm_head.weight"][80:], ours["lm_head.lm_head.special.weight"])
    back = state_dict_from_hf(hf, params.model)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key


def test_modules_implement_the_protocols():
    for cls, params in [
        (Qwen3DenseModel, small_model_params(num_hidden_layers=1)),
        (Qwen3DenseForCausalLM, small_causal_lm_params(num_hidden_layers=1)),
        (Qwen3DenseForClassification, small_classification_params(num_hidden_layers=1)),
    ]:
        model = build(cls, params)
        assert isinstance(model, ModuleLateInit)
        assert isinstance(model, ModuleSupportsPipelining)
    assert isinstance(Qwen3DenseLayer(small_model_params().layer), ModuleLateInit)


# --- late initialisation -----------------------------------------------------------------


def rope_reference(head_dim: int, base: float, positions: torch.Tensor):
    """RoPE cos/sin: inverse frequencies ``base ** (-2i / head_dim)``, angles duplicated
    over both halves of the head dimension; in fp64."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize(
    ("cls", "params_fn", "head_input"),
    [
        (Qwen3DenseForCausalLM, small_causal_lm_params, "labels"),
        (Qwen3DenseForClassification, small_classification_params, "pooling_mask"),
    ],
    ids=["causal_lm", "classification"],
)
def test_meta_build_to_empty_reset_and_load_matches_eager_model(cls, params_fn, head_input):
    params = params_fn(num_hidden_layers=2)
    eager = randomize_(build(cls, params, mode="mean"))
    with torch.device("meta"):
        late = build(cls, params, mode="mean")
    assert all(p.is_meta for p in late.parameters())
    late.to_empty(device="cpu")
    late.reset_parameters()
    late.load_state_dict(eager.state_dict(), strict=True)

    inputs = causal_inputs(params)
    inputs["hidden_states_agg_mask"] = torch.ones(2, 12)
    if head_input == "pooling_mask":
        inputs["pooling_mask"] = torch.zeros(2, 12, dtype=torch.long)
        inputs["pooling_mask"][:, -1] = 1
        del inputs["labels"]
    expected = eager(**inputs)
    actual = late(**inputs)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_rope_tables_are_rebuilt_by_reset_parameters_after_to_empty():
    params = small_causal_lm_params(num_hidden_layers=1, max_position_ids=128)
    with torch.device("meta"):
        model = build(Qwen3DenseForCausalLM, params)
    model.to_empty(device="cpu")
    rope = next(m for m in model.modules() if isinstance(m, RotaryEmbeddingProvider))
    for buffer in rope.buffers():
        buffer.fill_(float("nan"))  # what to_empty may leave behind
    model.reset_parameters()

    position_ids = torch.tensor([[0, 1, 2, 127], [5, 64, 100, 3]])
    cos, sin = rope(position_ids)
    assert cos.shape == sin.shape == (2, 4, 16)
    ref_cos, ref_sin = rope_reference(16, 10000.0, position_ids)
    # fp32 angles up to 127 rad carry ~1e-5 absolute rounding error.
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0.0, atol=3e-5)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0.0, atol=3e-5)
    # Same tables as an eagerly built model.
    eager_rope = next(
        m
        for m in build(Qwen3DenseForCausalLM, params).modules()
        if isinstance(m, RotaryEmbeddingProvider)
    )
    for got, want in zip(rope(position_ids), eager_rope(position_ids), strict=True):
        assert torch.equal(got, want)


def test_rope_tables_are_rebuilt_by_load_state_dict_without_reset_parameters():
    # Late init: to_empty, then reset_parameters() *or* load a checkpoint. A loader
    # never sees the non-persistent tables, so loading must rebuild them.
    params = small_causal_lm_params(num_hidden_layers=1)
    eager = build(Qwen3DenseForCausalLM, params)
    with torch.device("meta"):
        late = build(Qwen3DenseForCausalLM, params)
    late.to_empty(device="cpu")
    for buffer in late.buffers():
        buffer.fill_(float("nan"))
    late.load_state_dict(eager.state_dict())
    for got, want in zip(late.buffers(), eager.buffers(), strict=True):
        assert torch.equal(got, want)


def test_non_persistent_buffers_are_not_in_the_state_dict():
    model = build(Qwen3DenseForCausalLM, small_causal_lm_params(num_hidden_layers=1))
    buffers = dict(model.named_buffers())
    assert buffers, "the RoPE tables should be buffers"
    assert not set(buffers) & set(model.state_dict())
    assert all(key.endswith(".weight") for key in model.state_dict())


def test_reset_parameters_gives_pytorch_defaults_and_unit_norms():
    params = small_causal_lm_params(num_hidden_layers=1)
    with torch.device("meta"):
        model = build(Qwen3DenseForCausalLM, params)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(123.0)
    model.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif "embed_tokens" in name:  # nn.Embedding: N(0, 1)
            assert 0.8 < p.std().item() < 1.2, name
        else:  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(p.shape[1])
            assert p.abs().max().item() <= bound, name
            assert p.abs().max().item() > 0.9 * bound, name


# --- activation checkpointing ------------------------------------------------------------


def count_layer_calls(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    # A pre-hook: non-reentrant checkpointing stops recomputing as soon as the last saved
    # tensor is rebuilt, so a forward (post-)hook may never fire during the recompute.
    for module in model.modules():
        if isinstance(module, Qwen3DenseLayer):
            module.register_forward_pre_hook(hook)
    return calls


def test_checkpointing_gives_same_outputs_and_gradients_and_recomputes_layers():
    params = small_causal_lm_params(num_hidden_layers=2)
    plain = randomize_(build(Qwen3DenseForCausalLM, params, mode="mean"))
    ckpt = build(Qwen3DenseForCausalLM, params, mode="mean", enable_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    plain_calls, ckpt_calls = count_layer_calls(plain), count_layer_calls(ckpt)

    inputs = causal_inputs(params)
    inputs["hidden_states_agg_mask"] = torch.ones(2, 12)
    outs = []
    for model in (plain, ckpt):
        out = model(**inputs)
        (out["logps"].sum() + out["hidden_states_snapshot"].square().sum()).backward()
        outs.append(out)
    for key in ("logps", "hidden_states", "hidden_states_snapshot"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=0)
    plain_grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-6, atol=1e-7)
    # Each layer runs once in forward; checkpointing runs it again during backward.
    assert plain_calls[0] == 2
    assert ckpt_calls[0] == 4


# --- hidden-state snapshots --------------------------------------------------------------


def test_snapshot_is_masked_mean_of_embedding_and_every_layer_before_final_norm():
    params = small_causal_lm_params(num_hidden_layers=3)
    model = randomize_(build(Qwen3DenseForCausalLM, params, mode="mean"))
    captured = []
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.append(o))
    for layer in model.model.layers.values():
        layer.register_forward_hook(lambda m, i, o: captured.append(o))

    inputs = causal_inputs(params, batch=3, seq=10)
    mask = torch.zeros(3, 10)
    mask[0, :10] = 1
    mask[1, 2:5] = 1
    mask[2, 7] = 1
    out = model(**inputs, hidden_states_agg_mask=mask)
    snapshot = out["hidden_states_snapshot"]
    assert snapshot.shape == (1 + 3, 3, 64)
    assert len(captured) == 4
    expected = torch.stack(
        [(h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for h in captured]
    )
    torch.testing.assert_close(snapshot, expected, rtol=1e-5, atol=1e-6)
    # The last row is taken before the final norm, the returned hidden states after it.
    assert not torch.allclose(
        snapshot[-1], (out["hidden_states"] * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    )


def test_snapshot_mode_no_returns_none_and_mean_requires_a_mask():
    params = small_causal_lm_params(num_hidden_layers=1)
    inputs = causal_inputs(params)
    out = build(Qwen3DenseForCausalLM, params, mode="no")(**inputs)
    assert "hidden_states_snapshot" in out
    assert out["hidden_states_snapshot"] is None
    with pytest.raises(ValueError, match="hidden_states_agg_mask"):
        build(Qwen3DenseForCausalLM, params, mode="mean")(**inputs)


def test_snapshot_mode_accepts_the_enum_and_its_string():
    params = small_model_params(num_hidden_layers=1)
    model = build(Qwen3DenseModel, params, mode="mean")
    assert model.hidden_states_snapshot_mode is HiddenStatesAggregationMode.mean
    with pytest.raises(ValueError):
        build(Qwen3DenseModel, params, mode="max")


# --- positions -----------------------------------------------------------------------------


def test_rope_is_relative_shifted_positions_give_same_outputs_others_do_not():
    params = small_causal_lm_params(num_hidden_layers=2)
    model = randomize_(build(Qwen3DenseForCausalLM, params))
    inputs = causal_inputs(params)
    base = model(**inputs)["logps"]
    default_positions = torch.arange(12).expand(2, 12)
    explicit = model(**inputs, position_ids=default_positions)["logps"]
    assert torch.equal(explicit, base)
    shifted = model(**inputs, position_ids=default_positions + 50)["logps"]
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    spread = model(**inputs, position_ids=default_positions * 3)["logps"]
    assert (spread - base).abs().max() > 1e-2


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [96, 1000, -1])
def test_token_id_outside_vocab_raises_naming_the_value(bad_id):
    params = small_causal_lm_params(num_hidden_layers=1)
    inputs = causal_inputs(params)
    inputs["input_ids"][1, 4] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids.*(?<![\d-]){bad_id}(?!\d)"):
        build(Qwen3DenseForCausalLM, params)(**inputs)


@pytest.mark.parametrize("bad_label", [96, -5, -1])
def test_label_outside_vocab_other_than_ignore_index_raises_naming_the_value(bad_label):
    params = small_causal_lm_params(num_hidden_layers=1)
    model = build(Qwen3DenseForCausalLM, params)
    inputs = causal_inputs(params)
    inputs["labels"][0, 0] = -100  # allowed
    inputs["labels"][:, -1] = 95  # allowed (last id of the last split)
    model(**inputs)
    inputs["labels"][1, 2] = bad_label
    with pytest.raises(ValueError, match=rf"labels.*(?<![\d-]){bad_label}(?!\d)"):
        model(**inputs)


def test_sequence_longer_than_max_position_ids_raises():
    params = small_causal_lm_params(num_hidden_layers=1, max_position_ids=8)
    model = build(Qwen3DenseForCausalLM, params)
    ok = causal_inputs(params, seq=8)
    assert model(**ok)["logps"].shape == (2, 8)
    too_long = causal_inputs(params, seq=9)
    with pytest.raises(ValueError, match="max_position_ids"):
        model(**too_long)
    with pytest.raises(ValueError, match="max_position_ids"):
        model(**ok, position_ids=torch.arange(1, 9).expand(2, 8))


def test_missing_stage_inputs_raise():
    params = small_causal_lm_params(num_hidden_layers=2)
    first = build(Qwen3DenseForCausalLM, params, PipelineStageInfo(0, 2))
    last = build(Qwen3DenseForCausalLM, params, PipelineStageInfo(1, 2))
    with pytest.raises(ValueError, match="input_ids"):
        first(hidden_states=torch.zeros(2, 4, 64))
    with pytest.raises(ValueError, match="hidden_states"):
        last(input_ids=torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4).long())
    with pytest.raises(ValueError, match="labels"):
        last(hidden_states=torch.zeros(2, 4, 64))
    # The middle/first stage needs no labels.
    assert "logps" not in first(input_ids=torch.zeros(2, 4, dtype=torch.long))


def test_pooling_mask_of_wrong_shape_raises():
    params = small_classification_params(num_hidden_layers=1)
    model = build(Qwen3DenseForClassification, params)
    with pytest.raises(ValueError, match="pooling_mask"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long), pooling_mask=torch.ones(2, 4))


def test_classification_scores_all_tokens_without_pooling_mask():
    params = small_classification_params(num_labels=5, num_hidden_layers=1)
    model = randomize_(build(Qwen3DenseForClassification, params))
    ids = random_ids(96, 2, 6)
    all_scores = model(input_ids=ids)["scores"]
    assert all_scores.shape == (2, 6, 5)
    assert all_scores.dtype == torch.float32
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, 1] = mask[0, 4] = mask[1, 0] = 1
    pooled = model(input_ids=ids, pooling_mask=mask)["scores"]
    # Gathered in (batch, seq) order.
    torch.testing.assert_close(pooled, all_scores[[0, 0, 1], [1, 4, 0]])
