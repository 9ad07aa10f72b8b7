"""The step line's ETA: wall time per step since the first step, times the steps left."""

from d9d.train.progress import Progress, format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 725, 3600 * 3 + 7 * 60 + 59)] == [
        "0s",
        "45s",
        "1m00s",
        "12m05s",
        "3h07m",
    ]


def test_eta_ignores_the_first_step_and_counts_what_runs_between_steps():
    now = [0.0]
    progress = Progress(total_steps=10, clock=lambda: now[0])
    now[0] = 30.0  # the first step compiled for 30 s
    assert progress.eta_seconds(1, step_seconds=30.0) == 9 * 30.0
    now[0] = 32.0
    assert progress.eta_seconds(2, step_seconds=1.5) == 8 * 2.0
    now[0] = 39.0  # steps 2 to 4 and an evaluation in between: 9 s for 3 steps
    assert progress.eta_seconds(4, step_seconds=1.5) == 6 * 3.0
    now[0] = 56.0
    assert progress.eta_seconds(10, step_seconds=1.5) == 0.0
