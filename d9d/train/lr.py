"""Learning-rate schedules: linear warmup, then cosine, linear, warmup-stable-decay or constant.

Built on ``torch.optim.lr_scheduler.LambdaLR`` with a picklable multiplier object, so the
scheduler's ``state_dict()`` (its step count) is all a checkpoint needs.

Step ``s`` (0-based, the step about to run) gets ``lr * multiplier(s)``:

* warmup, ``s < W``: ``(s + 1) / W`` (the first step already trains, at ``lr / W``);
* then, with progress ``p = (s - W + 1) / (T - W)`` over the remaining steps (``T`` total,
  so the last step runs at the minimum):
  ``cosine``: ``m + (1 - m) * (1 + cos(pi * p)) / 2``; ``linear``: ``1 - (1 - m) * p``;
  ``wsd``: 1 until the last ``D`` steps, then linear down to ``m`` over them;
  ``constant``: 1. ``m`` is ``min_lr_ratio``.
"""

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "wsd", "constant")


@dataclass(frozen=True)
class LrMultiplier:
    """The multiplier of the peak learning rate at each step (see the module docstring).

    Attributes:
        schedule: ``"cosine"``, ``"linear"``, ``"wsd"`` or ``"constant"``.
        total_steps: Steps of the whole run.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: The final multiplier.
        decay_steps: ``"wsd"`` only: length of the final decay (``None``: 20% of the run).
    """

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; known: {SCHEDULES}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], "
                f"got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None and self.decay_steps > self.total_steps - self.warmup_steps:
            raise ValueError(
                f"decay_steps={self.decay_steps} does not fit after {self.warmup_steps} warmup "
                f"steps in {self.total_steps} steps"
            )

    def __call__(self, step: int) -> float:
        """The multiplier for 0-based ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        m = self.min_lr_ratio
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "wsd":
            decay = self.decay_steps or max(1, round(0.2 * (self.total_steps - self.warmup_steps)))
            start = self.total_steps - decay
            if step < start:
                return 1.0
            progress = min(1.0, (step - start + 1) / decay)
            return 1.0 - (1.0 - m) * progress
        span = max(1, self.total_steps - self.warmup_steps)
        # Steps past the end (a run extended without a new schedule) stay at the minimum.
        progress = min(1.0, (step - self.warmup_steps + 1) / span)
        if self.schedule == "linear":
            return 1.0 - (1.0 - m) * progress
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` following :class:`LrMultiplier` from the optimizer's current lr.

    Call ``scheduler.step()`` after each ``optimizer.step()``.

    Raises:
        ValueError: For an unknown schedule or steps that do not fit.
    """
    multiplier = LrMultiplier(schedule, total_steps, warmup_steps, min_lr_ratio, decay_steps)
    return LambdaLR(optimizer, multiplier)
