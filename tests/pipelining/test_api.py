"""Pipelining API: stage info, the layer split rule and the stage shape inference."""

import itertools

import pytest
import torch

from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.pipelining.api import (
    ModuleSupportsPipelining,
    PipelineStageInfo,
    distribute_layers_for_pipeline_stage,
)
from tests.helpers import (
    build,
    random_ids,
    small_causal_lm_params,
    small_classification_params,
    small_model_params,
)

# --- PipelineStageInfo -------------------------------------------------------------------


def test_stage_info_first_and_last():
    assert PipelineStageInfo(0, 1).is_current_stage_first
    assert PipelineStageInfo(0, 1).is_current_stage_last
    middle = PipelineStageInfo(1, 3)
    assert not middle.is_current_stage_first and not middle.is_current_stage_last
    assert PipelineStageInfo(0, 3).is_current_stage_first
    assert not PipelineStageInfo(0, 3).is_current_stage_last
    assert PipelineStageInfo(2, 3).is_current_stage_last
    assert PipelineStageInfo(current_stage=2, num_stages=3).current_stage == 2


@pytest.mark.parametrize(("current", "total"), [(3, 3), (-1, 2), (0, 0)])
def test_stage_info_rejects_out_of_range(current, total):
    with pytest.raises(ValueError):
        PipelineStageInfo(current, total)


# --- distribute_layers_for_pipeline_stage ------------------------------------------------


def ranges(num_layers, pre, post, num_stages):
    return [
        distribute_layers_for_pipeline_stage(
            num_layers, pre, post, PipelineStageInfo(s, num_stages)
        )
        for s in range(num_stages)
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((24, 1, 1, 4), [(0, 6), (6, 13), (13, 19), (19, 24)]),
        ((30, 0, 2, 4), [(0, 8), (8, 16), (16, 24), (24, 30)]),
        ((8, 0, 0, 1), [(0, 8)]),
        ((8, 0, 0, 3), [(0, 3), (3, 6), (6, 8)]),
    ],
)
def test_distribute_layers_reference_vectors(args, expected):
    assert ranges(*args) == expected


def test_distribute_layers_counts_for_34_layers_on_4_stages():
    assert [end - start for start, end in ranges(34, 0, 0, 4)] == [9, 9, 8, 8]


@pytest.mark.parametrize("args", [(2, 1, 1, 4), (3, 0, 0, 4), (4, 4, 0, 2), (4, 0, 4, 2)])
def test_distribute_layers_raises_when_a_stage_gets_no_layer(args):
    with pytest.raises(ValueError):
        ranges(*args)


@pytest.mark.parametrize("num_layers", [4, 7, 13, 24])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
@pytest.mark.parametrize(("pre", "post"), [(0, 0), (1, 0), (0, 1), (1, 2)])
def test_distribute_layers_covers_every_layer_once_and_balances(num_layers, num_stages, pre, post):
    try:
        result = ranges(num_layers, pre, post, num_stages)
    except ValueError:
        # Only allowed when some stage really would be left without a layer.
        total = num_layers + pre + post
        counts = [total // num_stages + (s < total % num_stages) for s in range(num_stages)]
        counts[0] -= pre
        counts[-1] -= post
        assert min(counts) <= 0
        return
    assert result[0][0] == 0 and result[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(result))
    virtual = [end - start for start, end in result]
    virtual[0] += pre
    virtual[-1] += post
    assert max(virtual) - min(virtual) <= 1
    assert virtual == sorted(virtual, reverse=True)


# --- infer_stage_inputs/outputs_from_pipeline_inputs -------------------------------------

BATCH, SEQ, LAYERS = 4, 6, 4

MODEL_KINDS = {
    "model": (Qwen3DenseModel, small_model_params),
    "causal_lm": (Qwen3DenseForCausalLM, small_causal_lm_params),
    "classification": (Qwen3DenseForClassification, small_classification_params),
}


def pipeline_inputs(kind):
    ids = random_ids(96, BATCH, SEQ)
    inputs = {"input_ids": ids, "hidden_states_agg_mask": torch.ones(BATCH, SEQ)}
    if kind == "causal_lm":
        inputs["labels"] = random_ids(96, BATCH, SEQ)
    if kind == "classification":
        pooling = torch.zeros(BATCH, SEQ, dtype=torch.long)
        pooling[:, -1] = 1
        inputs["pooling_mask"] = pooling
    return inputs


def assert_like(inferred: dict, real: dict):
    """Inferred tensors match every non-None real tensor in keys, shapes and dtypes."""
    real = {key: value for key, value in real.items() if value is not None}
    assert set(inferred) == set(real)
    for key, value in real.items():
        assert inferred[key].shape == value.shape, key
        assert inferred[key].dtype == value.dtype, key


@pytest.mark.parametrize("mode", list(HiddenStatesAggregationMode))
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("num_stages", [1, 3])
def test_infer_stage_shapes_equal_real_tensors(kind, mode, num_stages):
    cls, params_fn = MODEL_KINDS[kind]
    params = params_fn(num_hidden_layers=LAYERS)
    stages = [build(cls, params, PipelineStageInfo(i, num_stages), mode) for i in range(num_stages)]
    assert all(isinstance(stage, ModuleSupportsPipelining) for stage in stages)
    inputs = pipeline_inputs(kind)
    for n_microbatches in (1, 2, 4):
        rows = BATCH // n_microbatches
        micro = {key: value[:rows] for key, value in inputs.items()}
        hidden_states, snapshot = None, None
        for stage in stages:
            first, last = stage.stage.is_current_stage_first, stage.stage.is_current_stage_last
            if first:
                real_in = {"input_ids": micro["input_ids"]}
            else:
                real_in = {"hidden_states": hidden_states, "hidden_states_snapshot": snapshot}
            head = {}
            if last and kind == "causal_lm":
                head = {"labels": micro["labels"]}
            if last and kind == "classification":
                head = {"pooling_mask": micro["pooling_mask"]}
            real_out = stage(
                **real_in, hidden_states_agg_mask=micro["hidden_states_agg_mask"], **head
            )
            assert_like(
                stage.infer_stage_inputs_from_pipeline_inputs(inputs, n_microbatches), real_in
            )
            assert_like(
                stage.infer_stage_outputs_from_pipeline_inputs(inputs, n_microbatches), real_out
            )
            hidden_states = real_out["hidden_states"]
            snapshot = real_out["hidden_states_snapshot"]


def test_infer_classification_scores_without_pooling_mask_and_with_meta_mask():
    params = small_classification_params(num_labels=5, num_hidden_layers=2)
    model = build(Qwen3DenseForClassification, params)
    ids = random_ids(96, BATCH, SEQ)
    real = model(input_ids=ids[:2])["scores"]
    inferred = model.infer_stage_outputs_from_pipeline_inputs({"input_ids": ids}, 2)["scores"]
    assert inferred.shape == real.shape == (2, SEQ, 5)
    meta_mask = torch.empty(BATCH, SEQ, dtype=torch.long, device="meta")
    inferred = model.infer_stage_outputs_from_pipeline_inputs(
        {"input_ids": ids, "pooling_mask": meta_mask}, 2
    )["scores"]
    assert inferred.shape == (2, 5)
    assert inferred.dtype == torch.float32


def test_infer_follows_the_parameter_dtype():
    params = small_causal_lm_params(num_hidden_layers=2)
    stages = [
        build(Qwen3DenseForCausalLM, params, PipelineStageInfo(i, 2), "mean").to(torch.bfloat16)
        for i in range(2)
    ]
    inputs = pipeline_inputs("causal_lm")
    first_out = stages[0](input_ids=inputs["input_ids"], hidden_states_agg_mask=torch.ones(4, 6))
    last_out = stages[1](
        hidden_states=first_out["hidden_states"],
        hidden_states_snapshot=first_out["hidden_states_snapshot"],
        hidden_states_agg_mask=torch.ones(4, 6),
        labels=inputs["labels"],
    )
    assert_like(stages[0].infer_stage_outputs_from_pipeline_inputs(inputs, 1), first_out)
    assert_like(
        stages[1].infer_stage_inputs_from_pipeline_inputs(inputs, 1),
        {key: first_out[key] for key in ("hidden_states", "hidden_states_snapshot")},
    )
    assert_like(stages[1].infer_stage_outputs_from_pipeline_inputs(inputs, 1), last_out)
    assert last_out["hidden_states"].dtype == torch.bfloat16
    assert last_out["logps"].dtype == torch.float32


def test_infer_rejects_indivisible_microbatches_and_missing_input_ids():
    model = build(Qwen3DenseForCausalLM, small_causal_lm_params(num_hidden_layers=1))
    with pytest.raises(ValueError):
        model.infer_stage_inputs_from_pipeline_inputs({"input_ids": torch.zeros(4, 3)}, 3)
    with pytest.raises(ValueError, match="input_ids"):
        model.infer_stage_outputs_from_pipeline_inputs({"labels": torch.zeros(4, 3)}, 1)
