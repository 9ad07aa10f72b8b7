r"""Benchmark training of a Qwen3 Dense causal LM: tokens/s, TFLOP/s, MFU, memory, compile.

Runs real training steps (forward, backward, AdamW, zero-grad) on synthetic tokens for a
model preset and one or more compile presets (``compile_configs/*.toml``) and prints one
row per preset. With no flags it benchmarks the ``cpu-small`` model on the CPU (or the
first GPU) with a representative set of presets in about three minutes on two cores::

    python profiling/mfu.py
    python profiling/mfu.py --model qwen3-1.7b --seq-len 4096 --batch-size 1 \
        --config eager compile compile_sac compile_sac_float8 --json out.json

Under ``torchrun`` with ``--pp/--dp-shard/--dp-replicate/--tp`` every rank trains its
part (tensor parallelism, then FSDP2 per layer inside pipeline stages) and the table is
printed per device (tensor-parallel ranks share their tokens: FLOPs are divided by
``--tp``).

Progress goes to stderr (one line per step), the table to stdout. A bad argument prints
one ``error:`` line and exits with status 2; running out of device memory prints one line
and exits with status 1.
"""

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

# The harness is run as a script from a checkout; make the package importable without
# an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d9d.profiling.benchmark import (
    BenchmarkSpec,
    SingleProcessTrainer,
    run_benchmark,
    validate_spec,
)
from d9d.profiling.model_presets import MODEL_PRESETS, get_model_preset
from d9d.profiling.peak import resolve_peak_flops
from d9d.profiling.report import ProfileRecord, format_table

DEFAULT_CONFIGS = ("eager", "compile", "compile_sac", "compile_sac_float8")
"""Eager as the baseline, regional compile, its selective-AC variant, and float8 on top."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHAPE_FLAGS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage block: the flag and what is wrong with it.
        raise UsageError(message)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog="profiling/mfu.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="model presets:\n"
        + "\n".join(f"  {name:<11} {p.description}" for name, p in MODEL_PRESETS.items()),
    )
    parser.add_argument("--model", default="cpu-small", help="model preset (default cpu-small)")
    parser.add_argument(
        "--config",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help=f"compile presets from compile_configs/ (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=2,
        help="sequences per step, per data-parallel rank (default 2)",
    )
    parser.add_argument(
        "--seq-len", type=_int_at_least(1), default=256, help="tokens per sequence (default 256)"
    )
    parser.add_argument("--steps", type=_int_at_least(1), default=3, help="measured steps")
    parser.add_argument(
        "--warmup", type=_int_at_least(1), default=1, help="warm-up steps (the first compiles)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument(
        "--peak-tflops",
        type=_positive_float,
        default=None,
        help="peak dense TFLOP/s of one device in --dtype, bf16 for float8 configs "
        "(overrides the datasheet table / the CPU measurement)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write records")
    parser.add_argument(
        "--trace", type=Path, default=None, metavar="DIR", help="Chrome trace per config"
    )
    parser.add_argument("--trace-steps", type=_int_at_least(1), default=3)
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="compile every config into a fresh inductor cache (full compile cost)",
    )
    shape = parser.add_argument_group("model shape overrides (on top of --model)")
    for flag in _SHAPE_FLAGS:
        shape.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    dist = parser.add_argument_group("distributed (under torchrun)")
    dist.add_argument("--pp", type=_int_at_least(1), default=1, help="pipeline stages")
    dist.add_argument("--dp-shard", type=_int_at_least(1), default=1, help="FSDP shard degree")
    dist.add_argument("--dp-replicate", type=_int_at_least(1), default=1, help="HSDP replicas")
    dist.add_argument("--tp", type=_int_at_least(1), default=1, help="tensor-parallel degree")
    dist.add_argument(
        "--microbatches", type=_int_at_least(1), default=None, help="pipeline microbatches"
    )
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return " ".join(str(err).split())


def _model_params(args):
    """The model parameters and a name for them (the preset plus any overrides)."""
    preset = get_model_preset(args.model)
    overrides = {
        field: getattr(args, flag)
        for flag, field in _SHAPE_FLAGS.items()
        if getattr(args, flag) is not None
    }
    name = args.model.lower() + "".join(f" {k}={v}" for k, v in overrides.items())
    preset = dataclasses.replace(preset, **overrides)
    try:
        return preset.parameters(), name
    except ValidationError as err:
        raise ValueError(f"model shape rejected: {_one_line(err)}") from None


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: not a device: {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _load_configs(names: list[str]):
    from d9d.compile import load_compile_config

    return {name: load_compile_config(name) for name in names}


def _is_distributed(args) -> bool:
    degrees = (args.pp, args.dp_shard, args.dp_replicate, args.tp)
    return "WORLD_SIZE" in os.environ or any(degree > 1 for degree in degrees)


def run(args) -> list[ProfileRecord]:
    """Benchmarks every requested config; returns the records (also printed)."""
    params, model_name = _model_params(args)
    device = _device(args.device)
    spec = BenchmarkSpec(
        model_preset=model_name,
        params=params,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        dtype=_DTYPES[args.dtype],
        device=device,
        trace_dir=args.trace,
        trace_steps=args.trace_steps,
        cold_compile=args.cold_compile,
    )
    validate_spec(spec)
    configs = _load_configs(args.config)
    if _is_distributed(args):
        from d9d.profiling.distributed import run_distributed

        return run_distributed(spec, configs, args)

    # Resolved before anything runs: an unknown accelerator fails in a second, not after
    # the first config's compile.
    peaks = {
        float8: resolve_peak_flops(
            device, spec.dtype, float8=float8, override_tflops=args.peak_tflops
        )
        for float8 in {config.float8.enabled for config in configs.values()}
    }
    records = []
    for config in configs.values():
        float8 = config.float8.enabled

        def make_trainer(config=config):
            try:
                return SingleProcessTrainer(spec, config)
            except RuntimeError as err:
                # apply_compile_config raises RuntimeError for float8 on unfit hardware.
                raise ValueError(f"config {config.name}: {_one_line(err)}") from None

        records.append(run_benchmark(spec, config.name, make_trainer, peaks[float8], float8=float8))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        records = run(args)
    except (UsageError, ValueError) as err:
        # Includes UnknownAcceleratorError (a ValueError): its message asks for
        # --peak-tflops.
        print(f"{parser.prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as err:
        # Not a bad argument, but the fix is one: a smaller batch, sequence or model.
        print(
            f"{parser.prog}: out of memory: {_one_line(err)[:300]} (reduce --batch-size, "
            "--seq-len or the model, or shard it with torchrun --dp-shard/--pp)",
            file=sys.stderr,
        )
        return 1
    if not records:  # a non-zero rank of a distributed run prints nothing
        return 0
    print(format_table(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.model_dump() for r in records], indent=2) + "\n")
        print(f"records written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
