"""profiling/vs_hf.py end to end on a tiny shape: both implementations train, ratios add up."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "profiling" / "vs_hf.py"


def test_vs_hf_reports_every_contender_with_consistent_ratios(tmp_path):
    out = tmp_path / "vs_hf.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--num-layers=1",
            "--hidden-size=32",
            "--intermediate-size=64",
            "--num-heads=2",
            "--num-kv-heads=1",
            "--head-dim=16",
            "--vocab-size=64",
            "--device=cpu",
            "--seq-len=8",
            "--steps=2",
            "--warmup=1",
            "--no-hf-compile",
            "--config",
            "eager",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["contender"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"hf eager", "d9d eager"}
    base = records["hf eager"]["step_seconds_median"]
    for record in records.values():
        assert abs(record["tokens_per_second"] * record["step_seconds_median"] - 16) < 1e-6
        assert abs(record["speedup_vs_hf_eager"] - base / record["step_seconds_median"]) < 1e-9
    assert "d9d eager" in proc.stdout and "vs HF eager" in proc.stdout
    assert "dtype=bfloat16, cpu," in proc.stdout


def test_vs_hf_rejects_unknown_preset():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "no_such_preset"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no_such_preset" in proc.stderr
