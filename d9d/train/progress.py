"""The time a run has left, for the step line's ETA.

The estimate is the wall time per step since the first step of this process ended
(the first step compiles and warms up, so it would inflate every later estimate), times
the steps left. Wall time, not step time: evaluations, checkpoint saves and logging are
part of what the user waits for.
"""

import time


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"12m05s"``, ``"3h07m"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Estimates the time left from the steps this process has run.

    Args:
        total_steps: The run's last step.
        clock: Seconds (``time.perf_counter`` by default; tests pass their own).
    """

    def __init__(self, total_steps: int, clock=time.perf_counter):
        self.total_steps = total_steps
        self._clock = clock
        self._first: tuple[int, float] | None = None

    def eta_seconds(self, step: int, step_seconds: float) -> float:
        """The seconds left after ``step`` (call once per finished step, in order).

        Args:
            step: The step just finished.
            step_seconds: Its duration (the estimate until a second step has finished).
        """
        now = self._clock()
        left = self.total_steps - step
        if self._first is None:
            self._first = (step, now)
            return left * step_seconds
        first_step, first_time = self._first
        if step == first_step:
            return left * step_seconds
        return left * (now - first_time) / (step - first_step)
