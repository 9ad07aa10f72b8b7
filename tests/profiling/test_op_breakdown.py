"""The per-op breakdown and the GEMM-layout benchmark: every GEMM found and classed once."""

import sys
from pathlib import Path

import pytest
import torch

from d9d.metrics.flops import training_flops_per_token
from d9d.module.model.qwen3_dense.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "profiling"))
import gemm_layouts
import op_breakdown


@pytest.fixture
def no_process_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_every_gemm_of_the_step_is_classed_once(no_process_group_left):
    # Eager (no compile) keeps the test quick; the classes are the same under compile.
    args = op_breakdown._parser().parse_args(
        ["--model", "tiny", "--config", "eager", "--seq-len", "96", "--steps", "1", "--warmup", "1"]
    )
    seconds, time_us, flops = op_breakdown.measure(args)
    tokens = args.batch_size * args.seq_len
    params = get_model_preset("tiny").parameters()
    # The GEMM FLOPs the profiler saw are exactly the model's 6N per token.
    expected = training_flops_per_token(params, args.seq_len).matmul * tokens
    assert sum(flops.values()) == expected
    forward, input_grad, weight_grad = op_breakdown._CLASSES[:3]
    assert flops[forward] == flops[input_grad] == flops[weight_grad] > 0
    assert flops["LM head GEMMs (fwd + bwd)"] == 6 * 64 * 512 * tokens
    assert time_us["attention (SDPA fwd + bwd)"] > 0
    assert sum(time_us.values()) == pytest.approx(seconds * 1e6)


def test_token_count_equal_to_a_weight_dim_is_refused():
    args = op_breakdown._parser().parse_args(["--model", "tiny", "--seq-len", "32"])
    with pytest.raises(SystemExit, match="equals a weight dim"):
        op_breakdown.measure(args)  # 2 x 32 = 64 = hidden_size


def test_gemm_layouts_time_every_form():
    rates = gemm_layouts.gemm_forms(64, 32, 48, torch.float32, repeats=1)
    assert list(rates) == [
        "x @ W.T",
        "grad @ W",
        "grad.T @ x",
        "grad.T.contiguous() @ x",
        "(x.T @ grad).T",
    ]
    assert all(rate > 0 for rate in rates.values())


def test_optimizer_step_times_every_implementation(capsys):
    import optimizer_step

    assert optimizer_step.main(["--model", "tiny", "--rounds", "1", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "AdamW(fused)",
        "AdamW(foreach)",
        "AdamW(compiled)",
    ]
    assert all("GB/s" in line for line in lines)
