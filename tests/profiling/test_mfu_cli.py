"""profiling/mfu.py end to end (a subprocess on the tiny model) and its argument errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d9d.metrics.flops import training_flops_per_token
from d9d.module.model.qwen3_dense.presets import get_model_preset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "profiling" / "mfu.py"
sys.path.insert(0, str(SCRIPT.parent))
import mfu  # noqa: E402

REQUIRED_KEYS = {
    "config",
    "model",
    "device",
    "dtype",
    "batch_size",
    "seq_len",
    "world_size",
    "tokens_per_second",
    "model_flops_per_token",
    "achieved_flops_per_second",
    "peak_flops_per_second",
    "peak_flops_source",
    "mfu",
    "peak_memory_bytes",
    "memory_source",
    "first_step_seconds",
    "step_seconds_median",
    "graph_breaks",
    "recompiles",
    "optimizer_seconds_median",
    "activation_memory_bytes",
}
BATCH, SEQ = 2, 32


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mfu")
    # float8 without compile: exercises the float8 labelling without a second compile.
    eager_float8 = tmp / "eager_float8.toml"
    eager_float8.write_text('[float8]\nenabled = true\nskip_patterns = ["lm_head.*"]\n')
    out = tmp / "records.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model=tiny",
            f"--batch-size={BATCH}",
            f"--seq-len={SEQ}",
            "--steps=2",
            "--warmup=1",
            "--dtype=float32",
            "--device=cpu",
            f"--json={out}",
            f"--trace={tmp / 'trace'}",
            "--trace-steps=1",
            "--cold-compile",
            "--config",
            "eager",
            "compile",
            str(eager_float8),
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), tmp


def test_prints_the_table_and_progress(run_result):
    proc, _, _ = run_result
    header = proc.stdout.splitlines()[0]
    for column in ("config", "tokens/s", "TFLOP/s", "MFU", "peak mem", "first step s"):
        assert column in header
    for column in ("median step s", "graph breaks", "recompiles"):
        assert column in header
    assert "(vs float32)" in proc.stdout  # the float8 row, against its compute dtype
    assert "float8 (emulated: no float8 GEMM on this device) in eager_float8" in proc.stdout
    assert "AdamW(fused) (eager, eager_float8); AdamW(compiled) (compile)" in proc.stdout
    assert "includes compile into an empty inductor cache" in proc.stdout
    # One progress line per step on stderr: (warmup + steps) per config.
    assert proc.stderr.count("] step ") == 3 * 3
    assert "Traceback" not in proc.stderr


def test_json_records_are_complete_and_consistent(run_result):
    _, records, _ = run_result
    assert [r["config"] for r in records] == ["eager", "compile", "eager_float8"]
    params = get_model_preset("tiny").parameters()
    flops = training_flops_per_token(params, SEQ).total
    for rec in records:
        assert set(rec) >= REQUIRED_KEYS
        assert rec["model"] == params.model_dump()
        assert (rec["device"], rec["dtype"], rec["world_size"]) == ("cpu", "float32", 1)
        assert (rec["batch_size"], rec["seq_len"]) == (BATCH, SEQ)
        assert rec["model_flops_per_token"] == flops
        assert rec["tokens_per_second"] == pytest.approx(BATCH * SEQ / rec["step_seconds_median"])
        assert rec["achieved_flops_per_second"] == pytest.approx(rec["tokens_per_second"] * flops)
        assert rec["mfu"] == pytest.approx(
            rec["tokens_per_second"] * rec["model_flops_per_token"] / rec["peak_flops_per_second"]
        )
        assert 0 < rec["mfu"] < 1.5  # measured peak and tiny model: loose, but a fraction
        assert 0 < rec["optimizer_seconds_median"] < rec["step_seconds_median"]
        assert rec["first_step_seconds"] > 0
        assert (
            rec["peak_memory_bytes"] == rec["resident_memory_bytes"] + rec["step_peak_memory_bytes"]
        )
        assert rec["step_peak_memory_bytes"] > 0
        # The layers' saved activations: at least one (batch, seq, hidden) tensor per layer.
        hidden = params.model.layer.hidden_size
        assert rec["activation_memory_bytes"] >= BATCH * SEQ * hidden * 4
        assert rec["activation_memory_bytes"] < rec["step_peak_memory_bytes"]
        assert "measured substitute" in rec["memory_source"]
        assert rec["peak_flops_source"].startswith("measured on this CPU")
        assert (rec["graph_breaks"], rec["recompiles"]) == (0, 0)
        assert rec["compile_cache"] == "cold"
        assert math.isfinite(rec["loss_first"]) and abs(rec["loss_first"] - math.log(512)) < 1.0
    eager, compiled, float8 = records
    assert eager["compiled_graphs"] == 0 and compiled["compiled_graphs"] >= 1
    # Compile presets compile the AdamW step too (no graph break, no recompile: above).
    assert compiled["optimizer"] == "AdamW(compiled)" and eager["optimizer"] == "AdamW(fused)"
    # float8 on a CPU: emulated, and said so.
    assert float8["float8_gemms"] == "emulated: no float8 GEMM on this device"
    assert eager["float8_gemms"] is None
    assert not eager["float8"] and float8["float8"]
    # float8 is measured against the dtype the run otherwise computes in (float32 here).
    assert float8["peak_flops_dtype"] == "float32" and eager["peak_flops_dtype"] == "float32"
    assert "float8 run: MFU against the float32 peak" in float8["peak_flops_source"]


def test_trace_is_a_chrome_trace_per_config(run_result):
    _, _, tmp = run_result
    names = sorted(p.name for p in (tmp / "trace").iterdir())
    assert names == ["compile.json", "eager.json", "eager_float8.json"]
    trace = json.loads((tmp / "trace" / "eager.json").read_text())
    assert any(e.get("name") == "train_step_0" for e in trace["traceEvents"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "no_such_preset"], "unknown compile preset 'no_such_preset'"),
        (["--model", "qwen3-9b"], "unknown model preset 'qwen3-9b'"),
        (["--model", "tiny", "--seq-len", "300"], "max_position_ids=256"),
        (["--model", "tiny", "--num-heads", "3"], "must be divisible by num_key_value_heads"),
        (["--model", "tiny", "--num-layers", "0"], "num_hidden_layers"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--peak-tflops", "-3"], "must be > 0"),
        (["--device", "not-a-device"], "not a device"),
        (["--model", "tiny", "--device", "xpu"], "not supported"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    assert mfu.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("profiling/mfu.py: error: ")
    assert message in lines[0]
    assert captured.out == ""


def test_cuda_device_without_cuda_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mfu.main(["--model", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA is not available" in err


def test_out_of_memory_is_one_line_with_the_way_out(capsys, monkeypatch):
    def run_out_of_memory(args, output=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(mfu, "run", run_out_of_memory)
    assert mfu.main(["--model", "qwen3-32b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out of memory" in err and "--batch-size" in err


def test_bad_argument_exit_status_from_the_script():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "eager", "no_such_preset"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown compile preset 'no_such_preset'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_pipeline_and_fsdp_rates_are_per_device(tmp_path):
    out = tmp_path / "records.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            str(SCRIPT),
            "--model=tiny",
            "--config=eager",
            "--pp=2",
            "--batch-size=4",
            f"--seq-len={SEQ}",
            "--steps=2",
            "--warmup=1",
            "--device=cpu",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert (rec["world_size"], rec["batch_size"]) == (2, 4)
    # One pipeline of 2 stages: the global batch of 4 x SEQ tokens is shared by 2 devices.
    assert rec["tokens_per_second"] == pytest.approx(4 * SEQ / 2 / rec["step_seconds_median"])
    assert rec["mfu"] == pytest.approx(
        rec["tokens_per_second"] * rec["model_flops_per_token"] / rec["peak_flops_per_second"]
    )
    # Rank 0 holds the first stage; the merged record takes the loss from the last one.
    assert rec["loss_first"] == pytest.approx(math.log(512), abs=1.0)
    assert "max over ranks" in rec["memory_source"]
    assert rec["compile_cache"] == "warm"
    # The table is printed once (by rank 0), progress lines too.
    assert proc.stdout.count("| eager ") == 1
    assert proc.stderr.count("[eager] step ") == 3


def test_torchrun_context_parallel_rates_are_per_device(tmp_path):
    out = tmp_path / "records.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            str(SCRIPT),
            "--model=tiny",
            "--config=eager",
            "--cp=2",
            "--batch-size=2",
            f"--seq-len={SEQ}",
            "--steps=2",
            "--warmup=1",
            "--device=cpu",
            "--dtype=float32",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert (rec["world_size"], rec["batch_size"], rec["seq_len"]) == (2, 2, SEQ)
    # Both CP ranks read the same 2 rows and each trains on half of every row's tokens.
    assert rec["tokens_per_second"] == pytest.approx(2 * SEQ / 2 / rec["step_seconds_median"])
    # The loss of the whole rows (each rank's share of the global mean, summed).
    assert rec["loss_first"] == pytest.approx(math.log(512), abs=1.0)
    assert rec["activation_memory_bytes"] > 0
    assert proc.stdout.count("| eager ") == 1


def test_context_parallel_sequence_that_does_not_split_is_an_error(capsys, monkeypatch):
    # Refused before any process group exists (every rank alike).
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert mfu.main(["--model", "tiny", "--cp", "2", "--seq-len", "30", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seq-len 30 is not divisible by 2 x context-parallel degree = 4" in err


def test_parallel_flags_without_torchrun_are_an_error(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert mfu.main(["--model", "tiny", "--pp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "need torchrun: torchrun --nproc-per-node 2" in err


def test_out_of_memory_in_one_config_is_a_row_and_the_rest_still_run(tmp_path, capsys, monkeypatch):
    real_trainer = mfu.HarnessTrainer

    def trainer(spec, config):
        if config.name == "compile":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_trainer(spec, config)

    monkeypatch.setattr(mfu, "HarnessTrainer", trainer)
    out = tmp_path / "records.json"
    argv = ["--model=tiny", "--batch-size=1", "--seq-len=8", "--steps=1", "--dtype=float32"]
    argv += ["--device=cpu", "--peak-tflops=1", f"--json={out}", "--config", "compile", "eager"]
    assert mfu.main(argv) == 1  # the table is complete, but a config did not run
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[1].split("|")[1:3] == [f" {'compile':<26} ", f" {'out of memory':<10} "]
    assert rows[2].startswith("| eager ") and "MiB" in rows[2]
    assert "out of memory: compile: CUDA out of memory. Tried to allocate 20.00 GiB" in stdout
    statuses = [(r["config"], r["status"]) for r in json.loads(out.read_text())]
    assert statuses == [("compile", "out of memory"), ("eager", "ok")]


def test_cuda_device_index_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert mfu._device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="cuda:2: this machine has 2 CUDA device"):
        mfu._device("cuda:2")
    # Under torchrun the default is the local rank's GPU.
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert mfu._device(None) == torch.device("cuda", 1)
    assert chosen[-1] == torch.device("cuda", 1)


def test_gpu_defaults_are_a_real_shape_and_said_so(capsys):
    args = mfu.build_parser().parse_args(["--seq-len", "2048"])
    mfu._fill_defaults(args, torch.device("cuda", 0))
    assert (args.model, args.batch_size, args.seq_len) == ("qwen3-1.7b", 1, 2048)
    err = capsys.readouterr().err
    assert "--model qwen3-1.7b, --batch-size 1 (pass them to change)" in err
    assert args.dtype == "bfloat16"  # --dtype auto on a GPU
    args = mfu.build_parser().parse_args(["--dtype", "float32"])
    mfu._fill_defaults(args, torch.device("cpu"))
    assert (args.model, args.batch_size, args.seq_len) == ("cpu-small", 2, 256)
    assert capsys.readouterr().err == ""


def test_auto_dtype_on_the_cpu_is_measured_and_said(monkeypatch, capsys):
    from d9d.metrics import cpu_peak as peak

    measured = {torch.bfloat16: 100e9, torch.float32: 300e9}  # an AVX2-only CPU
    monkeypatch.setattr(peak, "measure_cpu_matmul_peak", lambda dtype: measured[dtype])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = mfu.build_parser().parse_args([])
    assert args.dtype == "auto"
    mfu._fill_defaults(args, torch.device("cpu"))
    assert args.dtype == "auto"  # measured only once the arguments are known valid
    mfu._resolve_auto_dtype(args)
    assert args.dtype == "float32"
    assert "--dtype auto chose float32 on this CPU" in capsys.readouterr().err


def test_importing_the_harness_does_not_load_torchao():
    # torchao prints "Failed to load ... .so" lines where its extensions do not match
    # torch: it must be imported only when a float8 config is about to run.
    code = (
        "import sys; sys.path.insert(0, 'profiling'); import mfu, d9d, d9d.profiling.distributed\n"
        "from d9d.compile import load_compile_config\n"
        "from d9d.profiling.support import unsupported_reason\n"
        "import torch\n"
        "config = load_compile_config('compile_sac')\n"
        "assert unsupported_reason(config, torch.device('cpu')) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('torchao')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
