"""In-process checks of the distributed API that need no process group."""

import pydantic
import pytest
import torch

from d9d.core.dist_context import DENSE_DIMS, DeviceMeshParameters
from d9d.pipelining.loss import CausalLMLoss, ClassificationLoss, PipelineLoss
from d9d.pipelining.schedule import PipelineScheduleKind


def test_mesh_parameters_defaults_and_world_size():
    params = DeviceMeshParameters()
    assert params.world_size == 1
    assert not params.is_tensor_parallel and not params.is_context_parallel
    params = DeviceMeshParameters(pipeline_parallel=2, data_parallel_shard=3, tensor_parallel=2)
    assert params.world_size == 12
    assert params.is_tensor_parallel
    assert DeviceMeshParameters(context_parallel_replicate=2).is_context_parallel


def test_mesh_parameters_are_validated_and_frozen():
    with pytest.raises(pydantic.ValidationError, match="data_parallel_shard"):
        DeviceMeshParameters(data_parallel_shard=0)
    with pytest.raises(pydantic.ValidationError, match="pipeline"):
        DeviceMeshParameters(pipeline=2)  # unknown field
    params = DeviceMeshParameters()
    with pytest.raises(pydantic.ValidationError):
        params.pipeline_parallel = 2


def test_dense_dims_are_the_spec_names():
    assert DENSE_DIMS == ("pp", "dp_replicate", "dp_cp_shard", "cp_replicate", "tp")


def test_schedule_kinds():
    assert {k.value for k in PipelineScheduleKind} == {"gpipe", "1f1b", "interleaved_1f1b"}


def test_causal_lm_loss_sums_and_counts_valid_tokens():
    loss = CausalLMLoss()
    assert isinstance(loss, PipelineLoss)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    logps = torch.tensor([[0.5, 0.0, 1.5], [0.0, 0.0, 2.0]])
    assert loss.count(labels).item() == 3
    assert loss({"logps": logps}, labels).item() == pytest.approx(4.0)


def test_classification_loss_is_summed_cross_entropy():
    loss = ClassificationLoss()
    scores = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, -100])
    expected = torch.nn.functional.cross_entropy(scores[:2], labels[:2], reduction="sum")
    assert loss.count(labels).item() == 2
    assert loss({"scores": scores}, labels).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="one label per scored row"):
        loss({"scores": scores}, labels[:2])
