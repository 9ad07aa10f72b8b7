"""metrics.jsonl across restarts: cut back, branch switches, half-written lines."""

import json

import pytest

from d9d.train import metrics_file


def _write(path, steps, extra=""):
    path.write_text(
        "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps) + extra
    )


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_records_after_the_resumed_step_go_of_any_kind(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3, 4])
    with path.open("a") as f:
        f.write(json.dumps({"kind": "eval", "step": 2, "loss": 1.0}) + "\n")
        f.write(json.dumps({"kind": "eval", "step": 4, "loss": 1.0}) + "\n")
    metrics_file.keep_until(path, 2, print)
    assert _steps(path) == [1, 2, 2]


def test_a_half_written_last_line_is_dropped_and_said(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3], extra='{"step": 4, "loss": 1.')
    log = []
    metrics_file.keep_until(path, 3, log.append)
    assert _steps(path) == [1, 2, 3]
    assert len(log) == 1
    assert log[0].startswith(f"dropped the half-written last line 4 of {path} (Expecting")


def test_a_broken_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a JSON record .*fix or remove"):
        metrics_file.keep_until(path, 3, print)


def test_switching_branches_keeps_each_branchs_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 13))  # b0 ran 12 steps
    metrics_file.switch_branch(path, "b0", path, 4, print)  # fork b1 at 4
    assert _steps(tmp_path / "metrics.b0.jsonl") == list(range(1, 13))
    assert _steps(path) == [1, 2, 3, 4]
    _write(path, range(1, 9))  # b1 ran to 8; now back to b0's step-12
    metrics_file.switch_branch(path, "b1", tmp_path / "metrics.b0.jsonl", 12, print)
    assert _steps(path) == list(range(1, 13))
    assert _steps(tmp_path / "metrics.b1.jsonl") == list(range(1, 9))


def test_a_fresh_start_moves_the_old_file_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2])
    log = []
    metrics_file.move_aside(path, log.append)
    assert not path.exists()
    (moved,) = tmp_path.glob("metrics.replaced-*.jsonl")
    assert _steps(moved) == [1, 2] and str(moved) in log[0]
