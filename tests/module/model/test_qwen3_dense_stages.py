"""Pipeline stages run one after another equal the one-stage model."""

import pytest
import torch

from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.pipelining.api import PipelineStageInfo
from tests.helpers import (
    build,
    load_stage_from_full,
    random_ids,
    randomize_,
    small_causal_lm_params,
    small_classification_params,
    small_model_params,
)

NUM_LAYERS = 8
BATCH, SEQ = 3, 10
MEAN = HiddenStatesAggregationMode.mean


def stage_inputs_and_head_inputs(kind: str, vocab_size: int):
    ids = random_ids(vocab_size, BATCH, SEQ + 1)
    agg_mask = torch.ones(BATCH, SEQ)
    agg_mask[1, 6:] = 0
    agg_mask[2, :3] = 0
    head = {}
    if kind == "causal_lm":
        labels = ids[:, 1:].clone()
        labels[0, :2] = -100
        head["labels"] = labels
    elif kind == "classification":
        pooling = torch.zeros(BATCH, SEQ, dtype=torch.long)
        pooling[0, -1] = pooling[1, 5] = pooling[2, 3] = 1
        head["pooling_mask"] = pooling
    return ids[:, :-1], agg_mask, head


def run_stages(stage_models, input_ids, agg_mask, head_inputs):
    """Runs the stages one after another like a pipeline schedule would."""
    hidden_states, snapshot, out = None, None, None
    for model in stage_models:
        last = model.stage.is_current_stage_last
        out = model(
            input_ids=input_ids if model.stage.is_current_stage_first else None,
            hidden_states=hidden_states,
            hidden_states_snapshot=snapshot,
            hidden_states_agg_mask=agg_mask,
            **(head_inputs if last else {}),
        )
        hidden_states, snapshot = out["hidden_states"], out["hidden_states_snapshot"]
        # One row for the embedding plus one per layer so far (keys are global indices).
        backbone = getattr(model, "model", model)
        layers_so_far = int(list(backbone.layers)[-1]) + 1
        assert snapshot.shape == (1 + layers_so_far, *hidden_states.shape[::2])
    return out


KINDS = {
    "model": (Qwen3DenseModel, small_model_params, None),
    "causal_lm": (Qwen3DenseForCausalLM, small_causal_lm_params, "logps"),
    "classification": (Qwen3DenseForClassification, small_classification_params, "scores"),
}


@pytest.mark.parametrize("num_stages", [2, 3, 4])
@pytest.mark.parametrize("kind", list(KINDS))
def test_stages_run_in_sequence_equal_the_one_stage_model(kind, num_stages):
    cls, params_fn, head_key = KINDS[kind]
    params = params_fn(num_hidden_layers=NUM_LAYERS)
    full = randomize_(build(cls, params, mode=MEAN))
    stages = []
    for i in range(num_stages):
        stage = build(cls, params, PipelineStageInfo(i, num_stages), mode=MEAN)
        load_stage_from_full(stage, full)
        stages.append(stage)
    # Every weight of the full model lives on exactly one stage, under the same name.
    stage_keys = [set(s.state_dict()) for s in stages]
    assert sum(len(k) for k in stage_keys) == len(full.state_dict())
    assert set().union(*stage_keys) == set(full.state_dict())

    input_ids, agg_mask, head_inputs = stage_inputs_and_head_inputs(kind, 96)
    expected = full(input_ids=input_ids, hidden_states_agg_mask=agg_mask, **head_inputs)
    actual = run_stages(stages, input_ids, agg_mask, head_inputs)

    assert actual["hidden_states_snapshot"].shape == (1 + NUM_LAYERS, BATCH, 64)
    keys = ["hidden_states", "hidden_states_snapshot"] + ([head_key] if head_key else [])
    assert set(actual) == set(expected) == set(keys)
    for key in keys:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("num_stages", "expected_keys"),
    [
        (1, [[str(i) for i in range(8)]]),
        (2, [["0", "1", "2", "3"], ["4", "5", "6", "7"]]),
        (3, [["0", "1", "2"], ["3", "4", "5"], ["6", "7"]]),
        (4, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),
    ],
)
def test_stage_modules_hold_global_layer_keys_and_their_own_parts(num_stages, expected_keys):
    params = small_causal_lm_params(num_hidden_layers=NUM_LAYERS)
    for i in range(num_stages):
        model = build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, num_stages))
        assert list(model.model.layers.keys()) == expected_keys[i]
        assert hasattr(model.model, "embed_tokens") == (i == 0)
        assert hasattr(model.model, "norm") == (i == num_stages - 1)
        assert hasattr(model, "lm_head") == (i == num_stages - 1)
        names = set(model.state_dict())
        assert any(k.startswith("model.embed_tokens.") for k in names) == (i == 0)
        assert ("model.norm.weight" in names) == (i == num_stages - 1)


def test_virtual_layers_shift_layers_between_stages():
    params = small_causal_lm_params(
        num_hidden_layers=6, pipeline_num_virtual_layers_pre=1, pipeline_num_virtual_layers_post=1
    )
    keys = [
        list(build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, 2)).model.layers)
        for i in range(2)
    ]
    assert keys == [["0", "1", "2"], ["3", "4", "5"]]
    # 6 + 2 virtual layers: 4 per stage, the embedding's 2 taken off the first stage.
    params = small_causal_lm_params(num_hidden_layers=6, pipeline_num_virtual_layers_pre=2)
    keys = [
        list(build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, 2)).model.layers)
        for i in range(2)
    ]
    assert keys == [["0", "1"], ["2", "3", "4", "5"]]
    params = small_causal_lm_params(num_hidden_layers=6, pipeline_num_virtual_layers_post=2)
    keys = [
        list(build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, 2)).model.layers)
        for i in range(2)
    ]
    assert keys == [["0", "1", "2", "3"], ["4", "5"]]


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_mean_snapshot_without_mask_raises_on_every_stage(kind):
    cls, params_fn, _ = KINDS[kind]
    params = params_fn(num_hidden_layers=3)
    input_ids, _, head_inputs = stage_inputs_and_head_inputs(kind, 96)
    for i in range(3):
        model = build(cls, params, PipelineStageInfo(i, 3), mode=MEAN)
        stage_inputs = (
            {"input_ids": input_ids} if i == 0 else {"hidden_states": torch.zeros(BATCH, SEQ, 64)}
        )
        if i == 2:
            stage_inputs.update(head_inputs)
        with pytest.raises(ValueError, match="hidden_states_agg_mask"):
            model(**stage_inputs)


def test_snapshot_mode_no_gives_none_on_every_stage():
    params = small_causal_lm_params(num_hidden_layers=3)
    stages = [build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, 3)) for i in range(3)]
    input_ids, _, head_inputs = stage_inputs_and_head_inputs("causal_lm", 96)
    hidden_states = None
    for model in stages:
        out = model(
            input_ids=input_ids if model.stage.is_current_stage_first else None,
            hidden_states=hidden_states,
            **(head_inputs if model.stage.is_current_stage_last else {}),
        )
        assert out["hidden_states_snapshot"] is None
        hidden_states = out["hidden_states"]
