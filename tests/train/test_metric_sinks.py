"""Metrics where users look: the console, metrics.jsonl, TensorBoard, W&B and the plot.

One real ``python -m d9d.train --plot`` run (5 steps, a line every 2 steps, an evaluation
every 2 steps, every sink on, W&B offline) is read back with each tool's own reader.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from d9d.train.plot import main as plot_main
from tests.helpers import read_wandb_offline_history
from tests.train._loop_scenarios import overrides, set_items, write_corpus

STEPS = 5
LOGGED = [2, 4, 5]  # log_interval = 2, and the last step
EVALUATED = [2, 4, 5]  # eval.interval = 2, and the last step
TRAIN_TAGS = {
    "train/loss": "loss",
    "train/grad_norm": "grad_norm",
    "train/lr": "lr",
    "train/tokens_per_second": "tokens_per_second",
    "train/mfu": "mfu",
    "train/memory_gib": "memory_bytes",
    "train/step_seconds": "step_seconds",
}
EVAL_TAGS = {
    "eval/loss": "eval_loss",
    "eval/perplexity": "eval_perplexity",
    "eval/tokens": "eval_tokens",
    "eval/seconds": "eval_seconds",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json_value(record: dict, key: str) -> float:
    return record[key] / 2**30 if key == "memory_bytes" else record[key]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sinks")
    corpus = write_corpus(workdir)
    output = workdir / "run"
    settings = overrides(
        corpus,
        output,
        steps=STEPS,
        log_interval=2,
        **{
            "eval.fraction": 0.02,
            "eval.interval": 2,
            "eval.max_batches": 2,
            "metrics.tensorboard": True,
            "metrics.wandb": True,
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # W&B keeps its own caches and settings outside the run folder: not in the user's home.
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_CACHE_DIR=str(workdir / "wandb_cache"),
        WANDB_CONFIG_DIR=str(workdir / "wandb_config"),
        WANDB_DATA_DIR=str(workdir / "wandb_data"),
    )
    cmd = [sys.executable, "-m", "d9d.train", "--plot"]
    for item in set_items(settings):
        cmd += ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return output, result, records


def test_console_lines(run):
    _, result, _ = run
    # The step and evaluation lines are the results (stdout), everything else is status.
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    evals = [line for line in lines if line.startswith("eval at step ")]
    assert steps + evals and sorted(steps + evals) == sorted(lines), lines
    # Quiet between lines: only every log_interval-th step (and the last) prints.
    assert [int(re.match(r"step +(\d+)/", line).group(1)) for line in steps] == LOGGED
    assert all(re.search(r"\| ETA (\d+s|\d+m\d\ds|\d+h\d\dm)$", line) for line in steps), steps
    assert [int(re.match(r"eval at step +(\d+)/", line).group(1)) for line in evals] == EVALUATED
    assert all(re.search(r"\| eval_loss \d+\.\d{4} \| perplexity ", line) for line in evals)
    # Everything else is a known status line; nothing reads as a problem.
    status = ("data: ", "eval: ", "precision: ", "MFU against ", "wandb: offline run in ", "wrote ")
    others = result.stderr.splitlines()
    assert all(line.startswith(status) for line in others), others
    assert not re.search(r"warn|error|traceback", result.stderr, re.IGNORECASE), result.stderr


def test_jsonl_records(run):
    _, _, records = run
    assert [r["step"] for r in records if "loss" in r] == LOGGED
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == EVALUATED
    for record in evals:
        assert set(record) == {"step", *EVAL_TAGS.values()}
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
        assert record["eval_tokens"] > 0 and record["eval_seconds"] > 0


def test_tensorboard_holds_every_logged_step(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _, records = run
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(TRAIN_TAGS) | set(EVAL_TAGS)
    for tags, kind, expected_steps in (
        (TRAIN_TAGS, "loss", LOGGED),
        (EVAL_TAGS, "eval_loss", EVALUATED),
    ):
        rows = [r for r in records if kind in r]
        for tag, key in tags.items():
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == expected_steps, tag
            # Event files store float32.
            assert [s.value for s in scalars] == pytest.approx(
                [_json_value(r, key) for r in rows], rel=1e-6
            ), tag


def test_wandb_offline_run_holds_every_logged_step(run):
    output, _, records = run
    (folder,) = (output / "wandb").glob("offline-run-*")
    history = read_wandb_offline_history(folder)
    by_step: dict[int, dict] = {}
    for entry in history:
        by_step.setdefault(entry["_step"], {}).update(entry)
    assert sorted(by_step) == sorted(set(LOGGED) | set(EVALUATED))
    for record in records:
        tags = EVAL_TAGS if "eval_loss" in record else TRAIN_TAGS
        logged = by_step[record["step"]]
        for tag, key in tags.items():
            assert logged[tag] == pytest.approx(_json_value(record, key), rel=1e-12), tag


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


def test_plot_of_the_run(run, tmp_path, capsys):
    output, _, _ = run
    _assert_png(output / "curves.png")
    out = tmp_path / "again.png"
    assert plot_main([str(output), "--out", str(out)]) == 0
    _assert_png(out)
    assert plot_main([str(tmp_path / "no_run")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_tensorboard_hides_the_steps_a_resumed_run_repeats(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from d9d.train.metric_sinks import TensorBoardSink

    crashed = TensorBoardSink(tmp_path)
    for step in (1, 2, 3, 4):
        crashed.write({"step": step, "loss": float(step)})
    crashed.close()
    # Resumed from the checkpoint of step 2: steps 3 and 4 run again, with new values.
    resumed = TensorBoardSink(tmp_path, resumed_step=2)
    for step in (3, 4, 5):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [(s.step, s.value) for s in scalars] == [(1, 1), (2, 2), (3, 30), (4, 40), (5, 50)]


def test_train_summary_reads_runs_with_evaluations(run):
    output, _, records = run
    script = Path(__file__).resolve().parents[2] / "profiling" / "train_summary.py"
    result = subprocess.run(
        [sys.executable, str(script), str(output)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[-1].split("|")
    last_eval = [r for r in records if "eval_loss" in r][-1]
    assert row[9].strip() == f"{last_eval['eval_loss']:.3f}"
    assert re.fullmatch(r" \d+\.\d\d \(\d+\) ", row[10])
