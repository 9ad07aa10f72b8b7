"""The CPU memory substitute: resident tensors plus the profiled peak of a step."""

import pytest
import torch
from torch import nn

from d9d.metrics.memory import (
    CPU_MEMORY_SOURCE,
    measure_cpu_step_memory,
    profiled_step_peak_bytes,
    resident_tensor_bytes,
    retained_forward_bytes,
)

MIB = 2**20


def test_resident_bytes_count_params_grads_buffers_and_optimizer_state():
    module = nn.Linear(256, 128, bias=False)  # 32768 fp32 weights = 128 KiB
    module.register_buffer("table", torch.zeros(1024))  # 4 KiB
    weight_bytes = 256 * 128 * 4
    assert resident_tensor_bytes(module) == weight_bytes + 4096
    optimizer = torch.optim.AdamW(module.parameters(), foreach=True)
    module(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    # weight + grad + exp_avg + exp_avg_sq + a 4-byte step counter + the buffer.
    assert resident_tensor_bytes(module, [optimizer]) == 4 * weight_bytes + 4 + 4096
    optimizer.zero_grad(set_to_none=True)
    assert resident_tensor_bytes(module, [optimizer]) == 3 * weight_bytes + 4 + 4096


def test_shared_storage_counts_once():
    module = nn.Module()
    module.a = nn.Parameter(torch.zeros(1000))
    module.register_buffer("view", module.a.data[:10])
    assert resident_tensor_bytes(module) == 4000


def test_profiled_peak_replays_allocations_and_frees():
    def step():
        big = torch.empty(MIB)  # 4 MiB
        mid = torch.empty(MIB // 2)  # 2 MiB: peak 6 MiB
        del big
        small = torch.empty(MIB // 4)  # 1 MiB on top of 2: below the peak
        return mid, small

    peak = profiled_step_peak_bytes(step, torch.device("cpu"))
    assert 6 * MIB <= peak < 6 * MIB + 64 * 1024


def test_frees_of_older_blocks_do_not_lower_the_peak():
    old = [torch.empty(MIB)]

    def step():
        old.pop()  # allocated before profiling: ignored, not -4 MiB
        return torch.empty(MIB // 4)

    assert profiled_step_peak_bytes(step, torch.device("cpu")) == pytest.approx(MIB, rel=0.05)


def test_measure_cpu_step_memory_adds_resident_and_step_peak():
    module = nn.Linear(512, 512, bias=False)
    optimizer = torch.optim.AdamW(module.parameters(), foreach=True)
    data = torch.randn(64, 512)

    def step():
        module(data).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    memory = measure_cpu_step_memory(step, module, [optimizer], torch.device("cpu"))
    assert memory.source == CPU_MEMORY_SOURCE
    assert memory.resident_bytes == 3 * 512 * 512 * 4 + 4
    # A step at least materialises the weight gradient (1 MiB) and the activations.
    assert memory.step_peak_bytes >= 512 * 512 * 4 + 64 * 512 * 4
    assert memory.peak_bytes == memory.resident_bytes + memory.step_peak_bytes


def test_retained_forward_bytes_counts_what_backward_keeps():
    weight = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(1024, 256)

    def forward():
        # tanh saves its output (1 MiB) for backward; the matmul saves x and weight,
        # which existed before; the intermediate product is freed after tanh.
        return torch.tanh(x @ weight).sum()

    retained = retained_forward_bytes(forward, torch.device("cpu"))
    assert MIB <= retained < MIB + 64 * 1024

    def no_grad_forward():
        with torch.no_grad():
            return torch.tanh(x @ weight).sum()

    assert retained_forward_bytes(no_grad_forward, torch.device("cpu")) < 1024
