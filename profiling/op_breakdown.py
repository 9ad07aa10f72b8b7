r"""Where a compiled training step's time goes: share of the step and TFLOP/s per op class.

Builds the model as the harness does (``d9d.profiling.benchmark.HarnessTrainer``: the
training stack's builder, the compile preset, pure ``--dtype``), runs warm-up steps, then
profiles forward + backward (no optimizer) of ``--steps`` steps, each on its own, with
``torch.profiler`` and inductor's per-kernel ranges, and prints one Markdown table for the
fastest step::

    python profiling/op_breakdown.py                                  # cpu-small, compile
    python profiling/op_breakdown.py --model cpu-small --num-layers 6 --vocab-size 48000

Op classes: the GEMMs by form (forward ``x @ W.T``, input gradient ``grad @ W``, weight
gradient ``grad.T @ x``; the LM head's apart), attention (SDPA forward and backward),
inductor's fused kernels (norms, RoPE, SiLU, casts, the loss) and everything else
(copies, framework overhead). Shares are of the profiled forward + backward wall time;
TFLOP/s is ``2 M N K`` per GEMM over its own time. The GEMM peak of the run's dtype is
measured as in the harness and printed with it.
"""

import argparse
import sys
import time
from collections import defaultdict

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from d9d.compile import load_compile_config
from d9d.core.host_memory import reuse_freed_host_memory
from d9d.core.log_filters import quiet_profiler_markers
from d9d.metrics.cpu_peak import measure_cpu_matmul_peak
from d9d.module.model.qwen3_dense.presets import preset_parameters
from d9d.profiling.benchmark import BenchmarkSpec, HarnessTrainer

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_CLASSES = (
    "GEMM forward x @ W.T",
    "GEMM input grad grad @ W",
    "GEMM weight grad grad.T @ x",
    "LM head GEMMs (fwd + bwd)",
    "attention (SDPA fwd + bwd)",
    "inductor fused kernels",
    "other",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profiling/op_breakdown.py", description=__doc__)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--config", default="compile", help="compile preset")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (fastest kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's malloc defaults instead of reusing freed host memory (as mfu.py)",
    )
    return parser


def _is_backward(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if "Backward" in parent.name or parent.name.startswith("autograd::engine"):
            return True
        parent = parent.cpu_parent
    return False


def _classify_mm(event, tokens: int, vocab: int) -> tuple[str, float] | None:
    shapes = event.input_shapes
    if len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    (m, k), (_, n) = shapes[0], shapes[1]
    flops = 2.0 * m * n * k
    # The head's weight is (vocab, hidden): vocab is N forward, K for the input gradient
    # and M for the weight gradient (which reduces over the tokens).
    if n == vocab or k == vocab or (m == vocab and k == tokens):
        return "LM head GEMMs (fwd + bwd)", flops
    if not _is_backward(event):
        return "GEMM forward x @ W.T", flops
    # Backward: the weight gradient reduces over the tokens.
    if k == tokens:
        return "GEMM weight grad grad.T @ x", flops
    return "GEMM input grad grad @ W", flops


def measure(args) -> tuple[float, dict[str, float], dict[str, float]]:
    """Profiles the configured step.

    Returns:
        The fastest step's forward+backward seconds, and per op class its microseconds
        and (GEMMs) FLOPs.
    """
    params = preset_parameters(
        args.model, num_hidden_layers=args.num_layers, vocab_size=args.vocab_size
    )
    tokens = args.batch_size * args.seq_len
    layer = params.model.layer
    dims = {params.model.vocab_size, layer.hidden_size, layer.intermediate_size}
    dims |= {layer.head_dim * layer.num_attention_heads, layer.head_dim * layer.num_key_value_heads}
    if tokens in dims:
        # GEMMs are told apart by their dims: the token count must not be a weight dim.
        raise SystemExit(
            f"profiling/op_breakdown.py: error: batch x seq = {tokens} tokens equals a weight "
            "dim of the model; change --seq-len or --batch-size"
        )
    dtype = _DTYPES[args.dtype]
    spec = BenchmarkSpec(
        model_preset=args.model,
        params=params,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    # As the harness: freed host memory reused (no page faults per step) unless asked.
    args.host_memory = None if args.system_malloc else reuse_freed_host_memory()
    # A profiler range per generated kernel, so that fused kernels are attributed.
    inductor_config.cpp.enable_kernel_profile = True
    trainer = HarnessTrainer(spec, load_compile_config(args.config))
    for _ in range(args.warmup):
        trainer.forward_backward()
        trainer.optimizer_step()
    quiet_profiler_markers()
    # Each step is profiled on its own and the fastest one is reported: other processes
    # on the machine only ever slow a step down.
    best = None
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            trainer.forward_backward()
            seconds = time.perf_counter() - start
        trainer.optimizer_step()
        if best is None or seconds < best[0]:
            best = (seconds, prof)
    seconds, prof = best
    vocab = params.model.vocab_size
    time_us: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for event in prof.events():
        name = event.name
        if name in ("aten::mm", "aten::addmm", "aten::bmm"):
            found = _classify_mm(event, tokens, vocab)
            if found is not None:
                time_us[found[0]] += event.self_cpu_time_total
                flops[found[0]] += found[1]
                continue
        if "scaled_dot_product" in name:
            time_us["attention (SDPA fwd + bwd)"] += event.self_cpu_time_total
        elif name.startswith("cpp_fused") or "cpp_fused" in name:
            time_us["inductor fused kernels"] += event.self_cpu_time_total
    time_us["other"] = max(0.0, seconds * 1e6 - sum(time_us.values()))
    return seconds, dict(time_us), dict(flops)


def breakdown(args) -> str:
    """Profiles the configured step; returns the Markdown table and its notes."""
    seconds, time_us, flops = measure(args)
    time_us, flops = defaultdict(float, time_us), defaultdict(float, flops)
    total_us = seconds * 1e6
    peak = measure_cpu_matmul_peak(_DTYPES[args.dtype])
    overrides = {"num_hidden_layers": args.num_layers, "vocab_size": args.vocab_size}
    lines = [
        "| op class | share of fwd+bwd | ms per step | TFLOP/s | % of GEMM peak |",
        "|---|---|---|---|---|",
    ]
    for name in _CLASSES:
        ms = time_us[name] / 1e3
        rate = flops[name] / (time_us[name] / 1e6) / 1e12 if flops[name] and time_us[name] else None
        lines.append(
            f"| {name} | {time_us[name] / total_us:.1%} | {ms:.1f} | "
            + (f"{rate:.3f} | {rate * 1e12 / peak:.0%} |" if rate else "- | - |")
        )
    shape = "".join(f" {k}={v}" for k, v in overrides.items() if v)
    gemm_classes = [name for name in _CLASSES if "GEMM" in name]
    gemm_flops = sum(flops[name] for name in gemm_classes)
    gemm_us = sum(time_us[name] for name in gemm_classes)
    lines += [
        "",
        f"model {args.model}{shape}, batch {args.batch_size} x seq {args.seq_len}, "
        f"{args.dtype}, preset {args.config}, {torch.get_num_threads()} threads; "
        f"forward+backward {seconds * 1e3:.1f} ms (the fastest of {args.steps} profiled "
        "steps, profiler on)",
        f"all GEMMs: {gemm_flops / gemm_us / 1e6:.3f} TFLOP/s over {gemm_us / total_us:.0%} "
        f"of the step; measured {args.dtype} GEMM peak {peak / 1e12:.3f} TFLOP/s "
        "(best square matmul 512-2048)",
        f"host memory: {args.host_memory or 'the C library malloc defaults'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    print(breakdown(_parser().parse_args(argv)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
