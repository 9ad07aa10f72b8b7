"""Cold compile time and step time of the compile presets on this machine.

For every (preset, number of layers) a fresh Python process builds a small causal LM,
applies the preset and times the first training step (cold: empty inductor cache, FX
graph and AOTAutograd caches off) and the median of the next steps. The first step
minus a steady step is the compile cost; regional compile should make it independent
of depth.

Usage:
    python profiling/compile_time.py                      # all presets, 2 and 32 layers
    python profiling/compile_time.py --presets compile_sac --layers 2 32 --steps 6
    python profiling/compile_time.py --device cuda --dtype bfloat16 --hidden-size 2048

Steps are timed with the harness's clock (device synchronised before each reading);
shape flags are named as in ``profiling/mfu.py``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _worker(args: argparse.Namespace) -> None:
    import torch

    from d9d.compile import load_compile_config
    from d9d.metrics.timers import DeviceClock
    from d9d.module.model.qwen3_dense import (
        Qwen3DenseForCausalLMParameters,
        Qwen3DenseLayerParameters,
        Qwen3DenseParameters,
    )
    from d9d.stack import build_stage_modules

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    clock = DeviceClock(device)
    torch.manual_seed(0)
    params = Qwen3DenseForCausalLMParameters(
        model=Qwen3DenseParameters(
            layer=Qwen3DenseLayerParameters(
                hidden_size=args.hidden_size,
                intermediate_size=args.hidden_size * 3,
                num_attention_heads=args.hidden_size // 64,
                num_key_value_heads=max(1, args.hidden_size // 128),
                rms_norm_eps=1e-6,
                head_dim=64,
            ),
            num_hidden_layers=args.num_layers,
            rope_base=10000,
            max_position_ids=args.seq_len,
            split_vocab_size={"text": args.vocab_size},
            split_vocab_order=["text"],
        )
    )
    (model,) = build_stage_modules(
        params,
        load_compile_config(args.preset),
        param_dtype=getattr(torch, args.dtype),
        device=device,
    ).modules
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
    input_ids = input_ids.to(device)

    def step() -> float:
        start = clock.now()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids[:, :-1], labels=input_ids[:, 1:])
        out["logps"].mean().backward()
        return clock.now() - start

    first = step()
    steady = statistics.median(step() for _ in range(args.steps))
    print(json.dumps({"first_step_s": first, "step_s": steady}))


def _run(preset: str, num_layers: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(
            os.environ,
            TORCHINDUCTOR_CACHE_DIR=cache_dir,
            TORCHINDUCTOR_FX_GRAPH_CACHE="0",
            TORCHINDUCTOR_AUTOGRAD_CACHE="0",
        )
        command = [sys.executable, __file__, "--worker", "--preset", preset]
        command += ["--num-layers", str(num_layers)]
        for flag in ("hidden_size", "seq_len", "batch_size", "vocab_size", "steps", "dtype"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        command += ["--device", args.device]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Runs the command line: one fresh process per preset and depth; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=None, help="default: all presets")
    parser.add_argument("--layers", nargs="*", type=int, default=[2, 32])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--steps", type=int, default=5, help="steady steps after the first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--num-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    from d9d.compile import list_presets

    presets = args.presets or list_presets()
    print(
        f"hidden {args.hidden_size}, seq {args.seq_len}, batch {args.batch_size}, "
        f"{args.dtype}, {args.device}, {time.strftime('%Y-%m-%d')}"
    )
    header = "| preset | layers | first step (s) | steady step (s) | compile (s) |"
    print(header + "\n|---|---|---|---|---|", flush=True)
    compile_s: dict[tuple[str, int], float] = {}
    for preset in presets:
        for num_layers in args.layers:
            try:
                timing = _run(preset, num_layers, args)
            except RuntimeError as err:
                # One preset that cannot run here (e.g. memory_budget on torch < 2.13)
                # must not cost the rest of the table.
                print(f"| {preset} | {num_layers} | failed: {err} | | |", flush=True)
                continue
            compile_s[preset, num_layers] = timing["first_step_s"] - timing["step_s"]
            print(
                f"| {preset} | {num_layers} | {timing['first_step_s']:.1f} | "
                f"{timing['step_s']:.3f} | {compile_s[preset, num_layers]:.1f} |",
                flush=True,
            )
    if len(args.layers) == 2:
        low, high = sorted(args.layers)
        print(f"\ncompile time ratio {high} / {low} layers:")
        for preset in presets:
            if compile_s.get((preset, low), 0.0) > 1.0 and (preset, high) in compile_s:
                # eager has nothing to compile; failed presets have no row
                print(f"  {preset}: {compile_s[preset, high] / compile_s[preset, low]:.2f}x")


if __name__ == "__main__":
    main()
