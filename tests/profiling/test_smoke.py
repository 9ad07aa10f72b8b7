"""The GPU smoke run's summary: manifest parsing, failure rules, the text, the shell side."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d9d.profiling import smoke
from d9d.profiling.report import ProfileRecord, SkippedRecord

REPO = Path(__file__).resolve().parents[2]


def _record(config: str, **changes) -> dict:
    values = dict(
        config=config,
        model_preset="qwen3-1.7b",
        model={},
        device="cuda:0",
        device_name="NVIDIA H200",
        dtype="bfloat16",
        precision="mixed: float32 parameters and optimizer, bfloat16 compute, float32 reduce",
        float8=False,
        batch_size=1,
        seq_len=4096,
        world_size=1,
        num_threads=16,
        steps=5,
        warmup=2,
        optimizer="AdamW(fused)",
        tokens_per_second=20_480.0,
        model_flops_per_token=12_000_000_000,
        matmul_flops_per_token=10_000_000_000,
        attention_flops_per_token=2_000_000_000,
        achieved_flops_per_second=20_480.0 * 12e9,
        peak_flops_per_second=989.4e12,
        peak_flops_dtype="bfloat16",
        peak_flops_source="H200 SXM bfloat16 dense 989.4 TFLOP/s (datasheet)",
        mfu=20_480.0 * 12e9 / 989.4e12,
        peak_memory_bytes=30 * 2**30,
        resident_memory_bytes=20 * 2**30,
        step_peak_memory_bytes=10 * 2**30,
        memory_source="cuda",
        first_step_seconds=41.5,
        step_seconds_median=0.2,
        optimizer_seconds_median=0.01,
        optimizer_fraction=0.05,
        graph_breaks=0,
        recompiles=0,
        compiled_graphs=1,
        compile_cache="warm",
        loss_first=11.9,
        loss_last=11.8,
        torch_version="2.11.0",
    )
    values.update(changes)
    return ProfileRecord(**values).model_dump()


def _skipped(config: str, status: str, reason: str) -> dict:
    return SkippedRecord(
        status=status,
        config=config,
        reason=reason,
        model_preset="qwen3-1.7b",
        device="cuda:0",
        dtype="bfloat16",
        float8=True,
    ).model_dump()


def _write_run(out: Path, steps: list[tuple[str, int, list[dict] | None]]) -> None:
    lines = []
    for name, returncode, records in steps:
        (out / f"{name}.log").write_text(f"first line of {name}\nlast line of {name}\n")
        json_name = "-"
        if records is not None:
            json_name = f"{name}.json"
            (out / json_name).write_text(json.dumps(records))
        lines.append(f"{name}\t{returncode}\t12\t{name}.log\t{json_name}")
    (out / smoke.STEPS_FILE).write_text("\n".join(lines) + "\n")


def test_a_clean_run_summarises_every_number_and_passes(tmp_path):
    float8_skip = "float8 training needs torchao, which is not installed (pip install torchao)"
    _write_run(
        tmp_path,
        [
            ("env", 0, None),
            (
                "real_table",
                0,
                [
                    _record("eager"),
                    _record("compile_sac", tokens_per_second=30_000.0, mfu=0.3638),
                    _skipped("compile_sac_float8", "skipped", float8_skip),
                ],
            ),
        ],
    )
    text, ok = smoke.summarize(smoke.read_steps(tmp_path))
    assert ok
    assert "device: NVIDIA H200 (cuda:0), torch 2.11.0" in text
    assert "peak: H200 SXM bfloat16 dense 989.4 TFLOP/s (datasheet)" in text
    assert "| env | ok | 12 |" in text and "| real_table | ok | 12 |" in text
    assert "### real_table: qwen3-1.7b, bfloat16 (mixed: float32 parameters" in text
    assert "| eager | 20,480 | 245.8 | 24.8% | 30.0 GiB | 41.5 | 0 | 0 |" in text
    assert "| compile_sac | 30,000 |" in text and "| 36.4% |" in text
    assert "| compile_sac_float8 | skipped | - |" in text
    assert "optimizer: eager AdamW(fused) 5.0% of the step; compile_sac AdamW(fused)" in text
    assert f"skipped: compile_sac_float8: {float8_skip}" in text
    assert text.endswith("2/2 steps passed")


@pytest.mark.parametrize(
    ("returncode", "records", "problem"),
    [
        (1, None, "broken: exit status 1"),
        (124, None, "broken: killed by its time limit after 12 s"),
        (0, [_record("eager"), _skipped("compile", "out of memory", "CUDA OOM")], "out of memory"),
        (0, [_skipped("compile", "failed", "RuntimeError: boom")], "failed: RuntimeError: boom"),
        (0, [_record("compile", graph_breaks=2)], "broken/compile: 2 graph breaks, 0 recompiles"),
        (0, [_record("compile", recompiles=1)], "broken/compile: 0 graph breaks, 1 recompiles"),
    ],
)
def test_each_kind_of_failure_fails_the_run_with_the_log_tail(
    tmp_path, returncode, records, problem
):
    _write_run(tmp_path, [("env", 0, None), ("broken", returncode, records)])
    text, ok = smoke.summarize(smoke.read_steps(tmp_path))
    assert not ok
    assert "| broken | FAILED | 12 |" in text
    failures = text.split("### failures")[1]
    assert problem in failures and "last line of broken" in failures
    assert text.endswith("1/2 steps passed")


def test_a_rerun_step_counts_by_its_last_run(tmp_path):
    _write_run(tmp_path, [("real_table", 1, None)])
    with (tmp_path / smoke.STEPS_FILE).open("a") as manifest:
        manifest.write("real_table\t0\t30\treal_table.log\t-\n")
    (step,) = smoke.read_steps(tmp_path)
    assert (step.returncode, step.seconds) == (0, 30.0)


def test_a_step_that_died_before_writing_its_records_has_none(tmp_path):
    (tmp_path / smoke.STEPS_FILE).write_text(
        "real_table\t137\t300\treal_table.log\treal_table.json\n"
    )
    (step,) = smoke.read_steps(tmp_path)
    assert step.records == [] and step.returncode == 137


def test_bad_manifests_are_errors_with_exit_status_2(tmp_path, capsys):
    assert smoke.main(["summarize", str(tmp_path)]) == 2
    assert "no steps.tsv" in capsys.readouterr().err
    (tmp_path / smoke.STEPS_FILE).write_text("env\t0\t1\n")
    assert smoke.main(["summarize", str(tmp_path)]) == 2
    assert "expected 5 tab-separated fields" in capsys.readouterr().err


def test_fp32_attention_check_runs_a_fused_kernel_on_the_cpu():
    # On the smoke run it runs on CUDA at 4096 tokens; here it proves the check itself.
    line = smoke.check_fp32_attention(seq_len=32, device="cpu")
    assert "_scaled_dot_product_flash_attention_for_cpu" in line


def test_context_parallel_check_runs_on_the_cpu():
    # The smoke run's context_parallel step launches this on the GPU (FlexAttention);
    # here the same command on the CPU with SDPA (FlexAttention has no CPU backward)
    # proves the check itself: two torchrun ranks against one process.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "d9d.profiling.smoke",
            "context-parallel",
            "--device",
            "cpu",
            "--backend",
            "sdpa",
            "--seq-len",
            "64",
            "--presets",
            "eager",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("context parallel")]
    assert "context parallel x2 (sdpa, eager) on cpu, 2 x 64 packed tokens" in line
    script = (REPO / "profiling" / "gpu_smoke.sh").read_text()
    assert "context_parallel" in script.split("ALL_STEPS=(")[1].split(")")[0]
    assert "-m d9d.profiling.smoke context-parallel --seq-len 1024" in script


def test_the_script_records_a_failing_step_and_exits_non_zero(tmp_path):
    # On this machine the env step fails (no CUDA): the manifest, the log and the exit
    # status still come out as they would on the GPU.
    proc = subprocess.run(
        ["bash", str(REPO / "profiling" / "gpu_smoke.sh"), str(tmp_path), "env"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    (step,) = smoke.read_steps(tmp_path)
    if step.returncode == 0:
        pytest.skip("this machine has a CUDA device: the env step passes")
    assert proc.returncode == 1, proc.stderr
    assert step.name == "env" and "no CUDA device" in step.log.read_text()
    assert "| env | FAILED |" in proc.stdout
    assert (tmp_path / "summary.md").read_text() == proc.stdout


def test_the_compile_modes_step_runs_every_mode_with_the_compiled_optimizer(tmp_path):
    # The GPU step itself, on this machine's device and the tiny model (the shape is the
    # step's one knob): three compile modes written as presets, each a measured row.
    proc = subprocess.run(
        ["bash", str(REPO / "profiling" / "gpu_smoke.sh"), str(tmp_path), "compile_modes"],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
            "SMOKE_MODES_SHAPE": "--model tiny --batch-size 2 --seq-len 64",
        },
    )
    (step,) = smoke.read_steps(tmp_path)
    assert step.returncode == 0, step.log.read_text()[-3000:]
    assert proc.returncode == 0 and "| compile_modes | ok |" in proc.stdout
    configs = [rec["config"] for rec in step.records]
    assert configs == ["sac_default", "sac_max_autotune_no_cudagraphs", "sac_reduce_overhead"]
    for rec in step.records:
        assert rec["status"] == "ok" and rec["optimizer"] == "AdamW(compiled)"
        assert (rec["graph_breaks"], rec["recompiles"]) == (0, 0)
    assert "sac_reduce_overhead AdamW(compiled)" in proc.stdout
