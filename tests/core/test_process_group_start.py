"""Process-group start: which accelerator a rank takes and what init_process_group gets."""

import pytest
import torch
import torch.distributed as dist

from d9d.core.dist_context import _accelerator_index, _process_group_kwargs


@pytest.mark.parametrize(
    ("env", "current", "expected"),
    [
        ({"LOCAL_RANK": "3", "RANK": "11"}, 0, 3),
        ({"LOCAL_RANK": "9"}, 0, 1),  # more local ranks than devices: wrap around
        ({"RANK": "13", "WORLD_SIZE": "16"}, 0, 5),  # no LOCAL_RANK: RANK % count
        ({}, 2, 2),  # a plain process keeps the device made current (--device cuda:2)
    ],
)
def test_accelerator_index(env, current, expected):
    assert _accelerator_index(env, device_count=8, current=current) == expected


def test_cuda_under_torchrun_binds_the_group_to_the_device():
    device = torch.device("cuda", 3)
    kwargs = _process_group_kwargs(device, {"RANK": "3", "WORLD_SIZE": "8"})
    # Rank and rendezvous come from the environment; device_id makes NCCL start eagerly.
    assert kwargs == {"backend": "nccl", "device_id": device}


def test_a_plain_process_on_cuda_is_a_bound_world_of_one():
    device = torch.device("cuda", 1)
    kwargs = _process_group_kwargs(device, {})
    assert isinstance(kwargs.pop("store"), dist.HashStore)
    assert kwargs == {"backend": "nccl", "rank": 0, "world_size": 1, "device_id": device}


def test_cpu_gets_gloo_and_no_device_id():
    assert _process_group_kwargs(torch.device("cpu"), {"WORLD_SIZE": "2"}) == {"backend": "gloo"}
    kwargs = _process_group_kwargs(torch.device("cpu"), {})
    assert "device_id" not in kwargs and kwargs["world_size"] == 1


def test_a_world_of_one_starts_with_these_arguments():
    # The kwargs really start a group (CPU here): world size 1, rank 0.
    assert not dist.is_initialized()
    dist.init_process_group(**_process_group_kwargs(torch.device("cpu"), {}))
    try:
        assert (dist.get_world_size(), dist.get_rank(), dist.get_backend()) == (1, 0, "gloo")
    finally:
        dist.destroy_process_group()
