"""Wall-clock timing of training steps that is honest on asynchronous devices.

CUDA kernels run asynchronously, so a host timestamp taken right after a launch measures
the launch, not the work. :class:`DeviceClock` synchronises the device before reading
the clock; on the CPU the synchronise is a no-op and the clock reads directly.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch


class DeviceClock:
    """A ``perf_counter`` that first waits for the device's queued work."""

    def __init__(self, device: torch.device):
        """Builds a clock for ``device``.

        Args:
            device: The device whose work must be finished before each reading.
        """
        self.device = device

    def now(self) -> float:
        """Seconds (``time.perf_counter``) after the device's queued work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@dataclass
class StepTimes:
    """Per-step timings of a run, the first (compile) step kept apart.

    Attributes:
        first_step_seconds: Wall time of the very first step (includes compilation).
        step_seconds: Wall time of each measured step.
        optimizer_seconds: Time of ``optimizer.step()`` + ``zero_grad()`` of each
            measured step.
    """

    first_step_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    optimizer_seconds: list[float] = field(default_factory=list)

    def add(self, step_seconds: float, optimizer_seconds: float) -> None:
        """Records one measured step."""
        self.step_seconds.append(step_seconds)
        self.optimizer_seconds.append(optimizer_seconds)

    @property
    def step_seconds_median(self) -> float:
        """Median measured step time (robust to a stray slow step)."""
        return statistics.median(self.step_seconds)

    @property
    def optimizer_seconds_median(self) -> float:
        """Median optimizer time of the measured steps."""
        return statistics.median(self.optimizer_seconds)
