"""Exact resume: N steps straight equal N/2 steps, a SIGKILL right after the checkpoint,
then N/2 resumed steps (same per-step losses, bit-identical final parameters and
optimizer state), in one process and under pp=2 x dp_shard=2 (4 processes, torchrun).
A checkpoint of the 4-process layout also resumes in one process. The runs evaluate a
held-out split every 2 steps, so the checkpoint falls between two evaluations and the
later held-out losses must be the same too.

The runs are real ``python -m d9d.train`` processes; the killed one uses the
``checkpoint.kill_after_save`` testing aid to SIGKILL itself right after its save.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.train._loop_scenarios import overrides, set_items, write_corpus, write_hf_init

STEPS = 6
HALF = STEPS // 2
FOUR = ["parallel.pipeline_parallel=2", "parallel.data_parallel_shard=2"]
RUN_TIMEOUT_S = 240
EVAL = {"eval.fraction": 0.02, "eval.interval": 2, "eval.max_batches": 4}
EVAL_STEPS = [2, 4, 6]


def _run(items: list[str], world: int = 1) -> subprocess.CompletedProcess:
    if world == 1:
        cmd = [sys.executable, "-m", "d9d.train"]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc-per-node={world}", "-m", "d9d.train"]
    for item in items:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def _records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(output_dir: Path) -> list[float]:
    rows = [r for r in _records(output_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _eval_losses(output_dir: Path) -> list[float]:
    rows = [r for r in _records(output_dir) if "eval_loss" in r]
    assert [r["step"] for r in rows] == EVAL_STEPS
    return [r["eval_loss"] for r in rows]


def _final_state(output_dir: Path, workdir: Path) -> dict:
    out = workdir / f"{output_dir.name}.pt"
    dcp_to_torch_save(output_dir / "checkpoints" / f"step-{STEPS}", out)
    return torch.load(out, weights_only=False)


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optim"].keys() == b["optim"].keys()
    for key, value in a["optim"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["optim"][key]), key
        else:
            assert value == b["optim"][key], key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(workdir)
    init = write_hf_init(workdir, corpus)

    def items(name: str, *extra: str) -> list[str]:
        base = overrides(
            corpus,
            workdir / name,
            steps=STEPS,
            **{"checkpoint.interval": HALF, "checkpoint.save_final": True, **EVAL},
        )
        return [*set_items({**base, "model.init": str(init)}), *extra]

    return workdir, items


def _straight_then_killed_then_resumed(workdir, items, name, world, layout):
    _ok(_run(items(f"{name}_straight", *layout), world))
    killed = _run(items(f"{name}_resumed", *layout, f"checkpoint.kill_after_save={HALF}"), world)
    if world == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    else:
        assert killed.returncode != 0, "torchrun must report the killed ranks"
    checkpoints = workdir / f"{name}_resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["lineage.json", f"step-{HALF}"]
    resumed = _run(items(f"{name}_resumed", *layout), world)
    _ok(resumed)
    assert f"resumed from {checkpoints / f'step-{HALF}'} at step {HALF}" in resumed.stderr
    straight_dir, resumed_dir = workdir / f"{name}_straight", workdir / f"{name}_resumed"
    assert _losses(resumed_dir) == _losses(straight_dir)
    assert _eval_losses(resumed_dir) == _eval_losses(straight_dir)
    _assert_bit_identical(_final_state(straight_dir, workdir), _final_state(resumed_dir, workdir))


def test_exact_resume_one_process(setup):
    workdir, items = setup
    _straight_then_killed_then_resumed(workdir, items, "one", 1, [])


def test_exact_resume_with_the_compiled_optimizer(setup):
    # The compiled AdamW step keeps plain floats in its param groups and scheduler: the
    # checkpoint and the resume are those of eager AdamW, and just as exact.
    workdir, items = setup
    _straight_then_killed_then_resumed(
        workdir, items, "compiled_adamw", 1, ["compile_optimizer=true"]
    )


def test_exact_resume_pp2_x_dp2_and_into_one_process(setup):
    workdir, items = setup
    _straight_then_killed_then_resumed(workdir, items, "four", 4, FOUR)
    # The 4-process checkpoint of step HALF resumes in one process and follows the
    # one-process run (same init, same data) up to summation order.
    source = workdir / "four_resumed" / "checkpoints"
    target = workdir / "cross" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(source / f"step-{HALF}", target / f"step-{HALF}")
    (workdir / "cross" / "metrics.jsonl").write_text(
        (workdir / "four_resumed" / "metrics.jsonl").read_text()
    )
    if not (workdir / "one_straight").is_dir():
        _ok(_run(items("one_straight")))
    _ok(_run(items("cross")))
    cross = _losses(workdir / "cross")
    one = _losses(workdir / "one_straight")
    # fp32 layouts differ by summation order only (see test_loop_layouts).
    assert cross == pytest.approx(one, rel=1e-5)
    assert _eval_losses(workdir / "cross") == pytest.approx(
        _eval_losses(workdir / "one_straight"), rel=1e-5
    )


@pytest.mark.parametrize(("world", "layout"), [(1, []), (2, ["parallel.data_parallel_shard=2"])])
def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(setup, world, layout):
    # The background write of step-4 is killed once the run has trained step 5: its files
    # are on disk, its manifest is not.
    workdir, items = setup
    name = f"async_killed_{world}"
    run = items(name, *layout, "checkpoint.async_save=true", "checkpoint.interval=2")
    killed = _run([*run, "checkpoint.kill_during_save=4"], world)
    assert killed.returncode != 0, killed.stderr[-4000:]
    checkpoints = workdir / name / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "lineage.json",
        "step-2",
        "step-4.tmp",
    ]
    partial = {p.name for p in (checkpoints / "step-4.tmp").iterdir()}
    assert "__0_0.distcp" in partial and "manifest.json" not in partial
    logged = [r for r in _records(workdir / name) if "loss" in r]  # eval records aside
    assert [r["step"] for r in logged] == list(range(1, len(logged) + 1))
    assert len(logged) >= 5, "training must go on during the background write"
    resumed = _run(run, world)
    _ok(resumed)
    assert f"resumed from {checkpoints / 'step-2'} at step 2" in resumed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["lineage.json", "step-4", "step-6"]
    # The steps the killed run had taken after step-2 run again, bit-identically.
    again = _losses(workdir / name)
    assert again[: len(logged)] == [r["loss"] for r in logged]
