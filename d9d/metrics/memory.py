"""Peak memory of a training step: exact on CUDA, a measured substitute on the CPU.

On CUDA the caching allocator keeps the numbers (``torch.cuda.max_memory_allocated``).
The CPU allocator keeps no statistics, and RSS is a poor substitute: glibc keeps freed
blocks mapped, so RSS says more about malloc's history than about the step. So on the
CPU the peak is rebuilt from what the training loop holds plus what one step allocates:

* *resident*: the bytes of every live parameter, gradient, buffer and optimizer-state
  tensor (unique storages), taken between steps;
* *step peak*: the highest net allocation during one extra (untimed) step, replayed from
  ``torch.profiler`` allocation events (``profile_memory=True``). Only blocks allocated
  inside that step are counted, so the number does not depend on earlier profiler runs.

``peak = resident + step peak`` then corresponds to what ``max_memory_allocated`` reports
on CUDA (tensor bytes, not allocator caching or fragmentation).
"""

import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from d9d.core.log_filters import quiet_profiler_markers

CUDA_MEMORY_SOURCE = "cuda: torch.cuda.max_memory_allocated over the measured steps"
CPU_MEMORY_SOURCE = (
    "cpu (measured substitute): live params/grads/buffers/optimizer state + peak net "
    "allocation of one extra step from torch.profiler memory events"
)


@dataclass(frozen=True)
class MemoryMeasurement:
    """Memory of a training step.

    Attributes:
        peak_bytes: Peak tensor bytes during a step (what MFU tables call peak memory).
        resident_bytes: Tensor bytes held between steps (weights, optimizer state, ...).
        step_peak_bytes: ``peak_bytes - resident_bytes``: the most a step adds on top
            (activations kept for backward, gradients, temporaries).
        source: How the numbers were obtained.
    """

    peak_bytes: int
    resident_bytes: int
    step_peak_bytes: int
    source: str


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A DTensor (FSDP2 shard) owns only its local shard's storage.
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def resident_tensor_bytes(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> int:
    """Bytes of the unique storages of a module's tensors and its optimizers' state.

    Counts parameters, their gradients (when not ``None``), buffers and every tensor in
    the optimizer state. Storages shared by several tensors count once.

    Args:
        module: The trained module.
        optimizers: Optimizers whose state to include.

    Returns:
        Total bytes.
    """
    tensors: list[torch.Tensor] = []
    for param in module.parameters():
        tensors.append(param)
        if param.grad is not None:
            tensors.append(param.grad)
    tensors.extend(module.buffers())
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        local = _local(tensor)
        if local.device.type == "meta":
            continue
        storage = local.untyped_storage()
        seen[(str(local.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _inside(node, scope_prefix: str) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.name.startswith(scope_prefix):
            return True
        parent = parent.parent
    return False


def _profiled_net_bytes(
    fn: Callable[[], object], device: torch.device, skip_scope: str | None = None
) -> tuple[int, int, object]:
    """Runs ``fn`` under ``torch.profiler``; returns (peak, final) net allocation and its result.

    The allocation events of ``device`` are replayed in time order; a free of a block
    that was allocated before the profiler started is ignored (its size is unknown to
    the profiler, and it was part of the resident set anyway). Blocks allocated inside a
    profiler scope whose name starts with ``skip_scope`` are left out altogether.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    quiet_profiler_markers()  # before kineto's first start: no USDT lines
    with profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    events = []
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        kind, fields = node.typed
        if kind != _EventType.Allocation:
            continue
        if fields.device.type != device.type:
            continue
        if skip_scope is not None and fields.alloc_size > 0 and _inside(node, skip_scope):
            continue
        events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    events.sort(key=lambda event: event[0])
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in events:
        if size > 0:
            live[ptr] = size
            current += size
        elif ptr in live:
            current -= live.pop(ptr)
        peak = max(peak, current)
    return peak, current, result


def profiled_step_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Runs ``step`` once under ``torch.profiler`` and returns its peak net allocation.

    Args:
        step: One training step.
        device: The device whose allocations count.

    Returns:
        The highest ``allocated - freed`` bytes reached during the step (>= 0).
    """
    peak, _, _ = _profiled_net_bytes(step, device)
    return peak


def retained_forward_bytes(forward: Callable[[], object], device: torch.device) -> int:
    """Bytes a forward leaves allocated while its output is alive: the activation memory.

    That is what the autograd graph keeps for backward (plus the small outputs), so it
    is what activation checkpointing trades against recompute. The output is dropped
    afterwards without a backward. On the CPU, what FSDP2 allocates inside its own
    scopes (``FSDP::all_gather`` and the copy into the unsharded parameters) is left
    out: gathered weights, not activations (the norm-and-head unit keeps them until its
    backward, which this forward never runs).

    Args:
        forward: Runs one forward with autograd on and returns its output.
        device: The device whose allocations count.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        output = forward()
        torch.cuda.synchronize(device)
        retained = torch.cuda.memory_allocated(device) - before
    else:
        _, retained, output = _profiled_net_bytes(forward, device, skip_scope="FSDP::")
    del output
    return max(0, retained)


class CudaPeakMemory:
    """Brackets the measured steps on CUDA: resets the peak, then reads it back."""

    def __init__(self, device: torch.device):
        """Resets the CUDA peak statistics of ``device``.

        Args:
            device: A CUDA device.
        """
        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.resident_bytes = torch.cuda.memory_allocated(device)

    def read(self) -> MemoryMeasurement:
        """The peak since construction."""
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return MemoryMeasurement(
            peak_bytes=peak,
            resident_bytes=self.resident_bytes,
            step_peak_bytes=max(0, peak - self.resident_bytes),
            source=CUDA_MEMORY_SOURCE,
        )


def measure_cpu_step_memory(
    step: Callable[[], object],
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    device: torch.device,
) -> MemoryMeasurement:
    """The CPU substitute: resident tensors now plus the profiled peak of one more step.

    Call it between steps (gradients already zeroed), after warm-up, so that lazily
    created optimizer state is resident and compilation is done.

    Args:
        step: One training step (it is run once more).
        module: The trained module.
        optimizers: Its optimizers.
        device: The device of the run.

    Returns:
        The measurement, labelled with :data:`CPU_MEMORY_SOURCE`.
    """
    optimizers = list(optimizers)
    resident = resident_tensor_bytes(module, optimizers)
    step_peak = profiled_step_peak_bytes(step, device)
    return MemoryMeasurement(
        peak_bytes=resident + step_peak,
        resident_bytes=resident,
        step_peak_bytes=step_peak,
        source=CPU_MEMORY_SOURCE,
    )


def process_peak_memory(device: torch.device) -> tuple[int, str]:
    """The process's peak memory so far, cheap enough to read every step.

    Args:
        device: The training device.

    Returns:
        ``(bytes, label)``: the CUDA allocator's peak (``"mem"``), or on the CPU the
        process's peak resident set size (``"peak RSS"``, which includes everything the
        process ever held, not just tensors).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "mem"
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
