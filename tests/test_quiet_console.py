"""A clean run prints only its own lines: the harness and the training CLI, end to end.

Each command runs in a fresh interpreter (library lines such as torchao's import
messages appear only once per process), on the tiny model and a few steps. Every
stderr line must be one the program itself writes; anything else (a library's warning,
a profiler marker) fails the test and is shown.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HARNESS_LINES = (
    r"profiling/mfu\.py: ",  # the harness's own notes (dtype choice, defaults)
    r"\[[\w.-]+\] ",  # per-config progress: "[compile_sac] step 2/2 (measured) ..."
    r"records written to ",
)
TRAIN_LINES = (
    r"tokenized \d+ documents",
    r"data: \d+ documents",
    r"precision: ",
    r"MFU against ",
    r"saved \S+ in ",
    r"exported an HF folder to ",
)


def _foreign_lines(stderr: str, own: tuple[str, ...]) -> list[str]:
    pattern = re.compile("|".join(f"(?:{line})" for line in own))
    return [line for line in stderr.splitlines() if line.strip() and not pattern.match(line)]


def test_main_job_defaults_print_only_the_harness_lines(tmp_path):
    # The main job's defaults (every default config, --dtype auto, the memory and
    # activation probes that start the profiler) on the tiny model, one measured step.
    proc = subprocess.run(
        [sys.executable, str(REPO / "profiling" / "mfu.py"), "--model", "tiny", "--steps", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile_sac_float8" in proc.stdout  # the float8 row ran (torchao was imported)
    assert _foreign_lines(proc.stderr, HARNESS_LINES) == []


@pytest.mark.parametrize("overrides", [[], ["compile_preset=compile_sac"]], ids=["defaults", "sac"])
def test_training_cli_prints_only_its_own_lines(tmp_path, overrides):
    args = ["steps=2", f"output_dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(
        [sys.executable, "-m", "d9d.train", *(f"--set={item}" for item in args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Step lines are the results, on stdout; stderr holds only the status lines.
    assert _foreign_lines(proc.stdout, (r"step +\d+/\d+ \| loss ",)) == []
    assert "step 2/2" in proc.stdout
    assert _foreign_lines(proc.stderr, TRAIN_LINES) == []
