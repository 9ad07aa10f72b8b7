"""Input checks: clear errors per call, whole-batch validation once per step."""

import pytest
import torch

from d9d.core.checks import check_token_range, inputs_prevalidated, value_checks_enabled
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.model.qwen3_dense.validation import validate_batch
from tests.helpers import (
    VOCAB,
    build,
    make_batch,
    small_causal_lm_params,
    small_classification_params,
)

PARAMS = small_causal_lm_params(num_hidden_layers=1)


def _batch(**changes):
    input_ids, labels = make_batch(2, 8)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.arange(8).expand(2, 8),
    }
    batch.update(changes)
    return batch


def test_a_valid_batch_passes():
    validate_batch(PARAMS, _batch())
    validate_batch(PARAMS.model, {"input_ids": _batch()["input_ids"]})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(input_ids=torch.zeros(2, 8)), "input_ids must hold integer ids"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids has an empty sequence"),
        (dict(input_ids=torch.zeros(8, dtype=torch.long)), r"input_ids must be \(batch, seq\)"),
        (
            dict(input_ids=torch.full((2, 8), VOCAB)),
            r"input_ids holds 16 value\(s\) outside \[0, 96\)",
        ),
        (
            dict(labels=torch.full((2, 8), -1)),
            r"labels holds 16 value\(s\) outside \[0, 96\) or -100",
        ),
        (dict(labels=torch.zeros(2, 7, dtype=torch.long)), r"labels has shape \(2, 7\)"),
        (dict(position_ids=torch.full((2, 8), 128)), r"position_ids .*\(max_position_ids\)"),
        (dict(position_ids=torch.full((2, 8), -1)), r"position_ids holds 16 value"),
        (dict(position_ids=torch.zeros(2, 8)), "position_ids must hold integer ids"),
        (dict(hidden_states_agg_mask=torch.ones(2, 9)), "hidden_states_agg_mask has shape"),
    ],
)
def test_bad_batches_name_the_input(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_batch(PARAMS, _batch(**changes))


def test_classification_labels_are_one_per_row():
    params = small_classification_params(num_hidden_layers=1, num_labels=3)
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    validate_batch(params, dict(batch, labels=torch.tensor([2, -100])))
    with pytest.raises(ValueError, match=r"outside \[0, 3\) or -100"):
        validate_batch(params, dict(batch, labels=torch.tensor([3, 0])))
    with pytest.raises(ValueError, match="one class per row"):
        validate_batch(params, dict(batch, labels=torch.zeros(2, 8, dtype=torch.long)))


def test_the_model_refuses_float_ids_and_empty_sequences():
    model = build(Qwen3DenseForCausalLM, PARAMS)
    with pytest.raises(ValueError, match="input_ids must hold integer ids"):
        model(input_ids=torch.zeros(2, 8), labels=torch.zeros(2, 8, dtype=torch.long))
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids has an empty sequence"):
        model(input_ids=empty, labels=empty)


def test_prevalidated_blocks_skip_only_the_value_checks():
    ids = torch.tensor([[0, VOCAB]])
    with pytest.raises(ValueError, match="outside"):
        check_token_range(ids, VOCAB, "input_ids")
    assert value_checks_enabled()
    with inputs_prevalidated():
        assert not value_checks_enabled()
        check_token_range(ids, VOCAB, "input_ids")  # the caller vouched for the values
        with pytest.raises(ValueError, match="integer"):  # dtype checks still run
            check_token_range(ids.float(), VOCAB, "input_ids")
    assert value_checks_enabled()
