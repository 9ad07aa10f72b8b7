"""Side-by-side training throughput: HF ``transformers`` Qwen3 vs this project's model.

Every contender trains on the same random tokens with the same shape, dtype and
optimizer; their steps are interleaved in one process (contender A step, B step, ...), so
machine noise hits all of them alike. Reports median tokens/s and the ratio to HF eager.

    python profiling/vs_hf.py                        # cpu-small shape, vocab 32000
    python profiling/vs_hf.py --vocab-size 151936    # realistic vocabulary
    python profiling/vs_hf.py --device cuda --model qwen3-1.7b --seq-len 4096 ...

Steps are timed with the harness's clock (the device is synchronised before each
reading, so asynchronous CUDA work is counted where it runs). The shape is a model preset
(``--model``) with the shape flags of ``profiling/mfu.py`` on top.
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from d9d.compile import list_presets, load_compile_config
from d9d.metrics.timers import DeviceClock
from d9d.module.model.qwen3_dense.hf import state_dict_from_hf
from d9d.module.model.qwen3_dense.hf_config import (
    causal_lm_params_from_hf_config,
    hf_config_from_params,
)
from d9d.module.model.qwen3_dense.presets import SHAPE_FLAGS, preset_parameters
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import SingleStageSchedule
from d9d.profiling.benchmark import make_adamw
from d9d.stack import build_stage_modules


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="cpu-small", help="model preset the shape flags override"
    )
    for flag in SHAPE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) first")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--config",
        nargs="+",
        default=["eager", "compile"],
        help="our presets from compile_configs/ to race against HF",
    )
    parser.add_argument("--no-hf-compile", action="store_true", help="skip HF + per-layer compile")
    parser.add_argument("--json", type=Path, help="write the records here")
    return parser.parse_args(argv)


def _make_step(
    model: torch.nn.Module, forward_backward: Callable[[], object], clock: DeviceClock
) -> Callable[[], float]:
    opt, _ = make_adamw(model.parameters(), lr=1e-5)

    def step() -> float:
        start = clock.now()
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock.now() - start

    return step


def main(argv: list[str] | None = None) -> int:
    """Runs the command line: interleaved training steps of HF and d9d; prints the table."""
    args = _parse_args(argv)
    unknown = sorted(set(args.config) - set(list_presets()))
    if unknown:
        print(
            f"vs_hf.py: unknown preset(s) {unknown}; available: {list_presets()}", file=sys.stderr
        )
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"vs_hf.py: --device: not a device: {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"vs_hf.py: --device {args.device}: CUDA is not available", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
    clock = DeviceClock(device)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    overrides = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    try:
        shape = preset_parameters(args.model, **overrides)
        shape = preset_parameters(
            args.model,
            **overrides,
            max_position_ids=max(shape.model.max_position_ids, args.seq_len),
        )
    except ValueError as err:
        print(f"vs_hf.py: {err}", file=sys.stderr)
        return 2
    hf_config = Qwen3Config(**hf_config_from_params(shape), attn_implementation="sdpa")
    # Our parameters read off the very config HF builds from, so both sides match.
    params = causal_lm_params_from_hf_config(hf_config.to_dict())
    vocab = params.model.vocab_size
    reference = Qwen3ForCausalLM(hf_config).to(dtype)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len)).to(device)
    # HF shifts inside; give ours the same targets (next token, last position ignored).
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    contenders: dict[str, Callable[[], float]] = {}
    hf_weights = state_dict_from_hf(reference.state_dict(), params.model)

    def hf_contender(compiled: bool) -> Callable[[], float]:
        model = Qwen3ForCausalLM(hf_config).to(dtype)
        model.load_state_dict(reference.state_dict())
        model.to(device)
        if compiled:
            for layer in model.model.layers:
                layer.compile(fullgraph=False)
        return _make_step(model, lambda: model(input_ids=ids, labels=ids).loss.backward(), clock)

    contenders["hf eager"] = hf_contender(False)
    if not args.no_hf_compile:
        contenders["hf + per-layer compile"] = hf_contender(True)
    for name in args.config:
        # The training stack's own builder, initialised with HF's weights.
        (model,) = build_stage_modules(
            params,
            load_compile_config(name),
            param_dtype=dtype,
            device=device,
            init=lambda modules: modules[0].load_state_dict(hf_weights),
        ).modules

        # The one step object the loop and the harness train with.
        schedule = SingleStageSchedule(model, CausalLMLoss())
        batch = {"input_ids": ids, "labels": labels}
        contenders[f"d9d {name}"] = _make_step(
            model, lambda schedule=schedule, batch=batch: schedule.step(batch), clock
        )

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in range(args.warmup + args.steps):
        for name, run in contenders.items():
            seconds = run()
            if step >= args.warmup:
                times[name].append(seconds)
            print(f"step {step} {name}: {seconds:.3f}s", file=sys.stderr)

    tokens = args.batch_size * args.seq_len
    base = statistics.median(times["hf eager"])
    records = []
    for name, values in times.items():
        median = statistics.median(values)
        records.append(
            {
                "contender": name,
                "tokens_per_second": tokens / median,
                "step_seconds_median": median,
                "speedup_vs_hf_eager": base / median,
            }
        )
    from tabulate import tabulate

    layer = params.model.layer
    print(
        f"shape: layers={params.model.num_hidden_layers} hidden={layer.hidden_size} "
        f"heads={layer.num_attention_heads}/{layer.num_key_value_heads} "
        f"head_dim={layer.head_dim} vocab={vocab} batch={args.batch_size} seq={args.seq_len} "
        f"dtype={args.dtype}, {device}, {args.steps} timed steps (median)"
    )
    print(
        tabulate(
            [
                [
                    r["contender"],
                    f"{r['tokens_per_second']:.0f}",
                    f"{r['step_seconds_median']:.3f}",
                    f"{r['speedup_vs_hf_eager']:.2f}x",
                ]
                for r in records
            ],
            headers=["contender", "tokens/s", "step s", "vs HF eager"],
        )
    )
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
