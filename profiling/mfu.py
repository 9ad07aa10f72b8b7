r"""Benchmark training of a Qwen3 Dense causal LM: tokens/s, TFLOP/s, MFU, memory, compile.

Runs real training steps (forward, backward, AdamW, zero-grad) on synthetic tokens for a
model preset and one or more compile presets (``compile_configs/*.toml``) and prints one
row per preset. With no flags it benchmarks a representative set of presets: on the CPU
the ``cpu-small`` model at 2 x 256 tokens (about three minutes on two cores), on a GPU
the ``qwen3-1.7b`` shape at 1 x 4096 tokens (a CPU-sized model would only measure kernel
launches there)::

    python profiling/mfu.py
    python profiling/mfu.py --model qwen3-1.7b --seq-len 4096 --batch-size 1 \
        --config eager compile compile_sac compile_sac_float8 --json out.json

Under ``torchrun`` with ``--pp/--dp-shard/--dp-replicate/--tp/--cp/--cp-replicate``
every rank trains its part (tensor and context parallelism, then FSDP2 per layer inside
pipeline stages) and the table is printed per device (tensor-parallel ranks share their
tokens: FLOPs are divided by ``--tp``; context-parallel ranks each hold ``1 / cp`` of
every row)::

    torchrun --standalone --nproc-per-node 2 profiling/mfu.py --cp 2 --seq-len 4096 \
        --batch-size 1 --config eager

Progress goes to stderr (one line per step), the table to stdout, one row as soon as its
config finishes (``--json`` is rewritten after each config too). A config this machine
cannot run (float8 without torchao, ...) is a ``skipped``
row with the reason; an out-of-memory or another failure inside one config is an
``out of memory`` / ``failed`` row, the other configs still run, and the exit status is
1. A bad argument prints one ``error:`` line and exits with status 2.
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError

from d9d.compile import load_compile_config
from d9d.core.dist_context import DeviceMeshParameters
from d9d.core.host_memory import reuse_freed_host_memory
from d9d.metrics.cpu_peak import faster_cpu_dtype, faster_dtype_note
from d9d.metrics.peak import dtype_name, resolve_peak_flops
from d9d.module.model.qwen3_dense.presets import MODEL_PRESETS, SHAPE_FLAGS, preset_parameters
from d9d.profiling.benchmark import (
    BenchmarkSpec,
    HarnessTrainer,
    iter_configs,
    validate_spec,
)
from d9d.profiling.report import Record, table_footer, table_header, table_row

DEFAULT_CONFIGS = ("eager", "compile", "compile_sac", "compile_sac_float8")
"""Eager as the baseline, regional compile, its selective-AC variant, and float8 on top."""

CPU_DEFAULTS = {"model": "cpu-small", "batch_size": 2, "seq_len": 256}
GPU_DEFAULTS = {"model": "qwen3-1.7b", "batch_size": 1, "seq_len": 4096}
"""Shape defaults by device: a GPU needs a real model to be measured rather than its
kernel launches."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    parser.add_argument(
        "--model",
        default=None,
        help=f"model preset (default {CPU_DEFAULTS['model']} on the CPU, "
        f"{GPU_DEFAULTS['model']} on a GPU)",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help=f"compile presets from compile_configs/ (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=None,
        help="sequences per step, per data-parallel rank (default 2 on the CPU, 1 on a GPU)",
    )
    parser.add_argument(
        "--seq-len",
        type=_int_at_least(1),
        default=None,
        help="tokens per sequence (default 256 on the CPU, 4096 on a GPU)",
    )
    parser.add_argument("--steps", type=_int_at_least(1), default=3, help="measured steps")
    parser.add_argument(
        "--warmup", type=_int_at_least(1), default=1, help="warm-up steps (the first compiles)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *sorted(_DTYPES)],
        default="auto",
        help="compute dtype; auto (default): bfloat16 on a GPU, and on the CPU whichever of "
        "bfloat16/float32 its measured matmul peak favours (bfloat16 under torchrun)",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fp32 parameters and AdamW state, --dtype compute, fp32 gradient reduction "
        "(FSDP2 MixedPrecisionPolicy, as torchtitan reports MFU); --no-mixed-precision keeps "
        "everything in --dtype (default: on for CUDA, off on the CPU)",
    )
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
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="on the CPU, keep glibc's malloc defaults (every large tensor mmapped and "
        "unmapped again: page faults each step) instead of reusing freed host memory "
        "(d9d.core.host_memory)",
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="train the same log-normal documents packed vs one per padded row: useful "
        "tokens/s, per-document FLOPs and the document mask's cost (d9d/profiling/packed.py)",
    )
    shape = parser.add_argument_group("model shape overrides (on top of --model)")
    for flag in SHAPE_FLAGS:
        shape.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    dist = parser.add_argument_group("distributed (under torchrun)")
    dist.add_argument("--pp", type=_int_at_least(1), default=1, help="pipeline stages")
    dist.add_argument("--dp-shard", type=_int_at_least(1), default=1, help="FSDP shard degree")
    dist.add_argument("--dp-replicate", type=_int_at_least(1), default=1, help="HSDP replicas")
    dist.add_argument("--tp", type=_int_at_least(1), default=1, help="tensor-parallel degree")
    dist.add_argument(
        "--cp",
        type=_int_at_least(1),
        default=1,
        help="context-parallel degree (weights sharded over dp-shard x cp)",
    )
    dist.add_argument(
        "--cp-replicate",
        type=_int_at_least(1),
        default=1,
        help="context-parallel degree whose ranks replicate the weights",
    )
    dist.add_argument(
        "--microbatches", type=_int_at_least(1), default=None, help="pipeline microbatches"
    )
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return " ".join(str(err).split())


def _fill_defaults(args, device: torch.device) -> None:
    """Fills ``--model/--batch-size/--seq-len/--dtype`` left unset with the device's defaults."""
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    filled = {}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            filled[name] = value
    if args.dtype == "auto" and (device.type != "cpu" or _is_distributed(args)):
        # Every rank must agree without measuring; GPUs train in bf16.
        args.dtype = "bfloat16"
    if filled and device.type == "cuda":
        print(
            "profiling/mfu.py: on a GPU the defaults are "
            + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in filled.items())
            + " (pass them to change)",
            file=sys.stderr,
        )


def _resolve_auto_dtype(args) -> None:
    """``--dtype auto`` on a single CPU process: the dtype its matmul peak favours.

    Measured only once the arguments are known to be valid (it takes seconds).
    """
    if args.dtype == "auto":
        dtype, why = faster_cpu_dtype()
        args.dtype = dtype_name(dtype)
        print(f"profiling/mfu.py: {why}", file=sys.stderr)


def _model_params(args):
    """The model parameters and a name for them (the preset plus any overrides)."""
    overrides = {
        field: getattr(args, flag)
        for flag, field in SHAPE_FLAGS.items()
        if getattr(args, flag) is not None
    }
    name = args.model.lower() + "".join(f" {k}={v}" for k, v in overrides.items())
    return preset_parameters(args.model, **overrides), name


def _device(text: str | None) -> torch.device:
    """The run's device; a CUDA device also becomes the current one.

    Kernels launched without an explicit device (and NCCL) use the current device:
    ``--device cuda:1`` must not leave stray work on ``cuda:0``.
    """
    if text is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            # Under torchrun each rank takes its own GPU (not the first one on every rank).
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"--device: not a device: {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def _is_distributed(args) -> bool:
    degrees = (args.pp, args.dp_shard, args.dp_replicate, args.tp, args.cp, args.cp_replicate)
    return "WORLD_SIZE" in os.environ or any(degree > 1 for degree in degrees)


class _Output:
    """Prints the table as it grows and keeps ``--json`` up to date after every config."""

    def __init__(self, json_path: Path | None):
        self.json_path = json_path
        self.records: list[Record] = []

    def add(self, record: Record) -> None:
        if not self.records:
            print(table_header(), flush=True)
        self.records.append(record)
        print(table_row(record), flush=True)
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            dumped = [r.model_dump() for r in self.records]
            self.json_path.write_text(json.dumps(dumped, indent=2) + "\n")

    def finish(self, notes: list[str]) -> None:
        if not self.records:  # a non-zero rank of a distributed run prints nothing
            return
        print(table_footer(self.records, notes), flush=True)
        if self.json_path is not None:
            print(f"records written to {self.json_path}", file=sys.stderr)


def run(args, output: _Output | None = None) -> list[Record]:
    """Benchmarks every requested config; returns the records (also printed)."""
    output = output or _Output(None)
    device = _device(args.device)
    _fill_defaults(args, device)
    params, model_name = _model_params(args)
    spec = BenchmarkSpec(
        model_preset=model_name,
        params=params,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        dtype=_DTYPES.get(args.dtype, torch.float32),  # "auto" is resolved below
        device=device,
        trace_dir=args.trace,
        trace_steps=args.trace_steps,
        cold_compile=args.cold_compile,
        mixed_precision=(
            device.type == "cuda" if args.mixed_precision is None else args.mixed_precision
        ),
    )
    validate_spec(spec)
    configs = [load_compile_config(name) for name in args.config]
    host_memory = None
    if device.type == "cpu" and not args.system_malloc:
        host_memory = reuse_freed_host_memory()
    _resolve_auto_dtype(args)
    spec = dataclasses.replace(spec, dtype=_DTYPES[args.dtype])
    records: Iterator[Record]
    if args.packed:
        return _run_packed(args, spec, configs)
    if _is_distributed(args):
        from d9d.profiling.distributed import iter_distributed

        mesh = DeviceMeshParameters(
            pipeline_parallel=args.pp,
            data_parallel_shard=args.dp_shard,
            data_parallel_replicate=args.dp_replicate,
            tensor_parallel=args.tp,
            context_parallel_shard=args.cp,
            context_parallel_replicate=args.cp_replicate,
        )
        records = iter_distributed(
            spec, configs, mesh, n_microbatches=args.microbatches, peak_tflops=args.peak_tflops
        )
    else:
        # Resolved before anything runs: an unknown accelerator fails in a second, not
        # after the first config's compile.
        peaks = {
            float8: resolve_peak_flops(
                device, spec.dtype, float8=float8, override_tflops=args.peak_tflops
            )
            for float8 in {config.float8.enabled for config in configs}
        }
        records = iter_configs(
            spec,
            configs,
            lambda config: HarnessTrainer(spec, config),
            lambda config: peaks[config.float8.enabled],
        )
    for record in records:
        output.add(record)
    if torch.distributed.is_initialized():
        # The world of one that mixed precision runs FSDP2 on.
        torch.distributed.destroy_process_group()
    notes = []
    if device.type == "cpu":
        notes.append(
            f"host memory: {host_memory}"
            if host_memory
            else "host memory: the C library's malloc defaults (large tensors mapped afresh "
            "each step)"
        )
    if output.records and args.peak_tflops is None:
        note = faster_dtype_note(device, spec.dtype)
        if note is not None:
            notes.append(note)
    output.finish(notes)
    return output.records


def _run_packed(args, spec, configs) -> list[Record]:
    """``--packed``: prints its own table (and JSON); returns no standard records."""
    from d9d.profiling.packed import format_packed_table, run_packed_benchmark, write_packed_json

    if _is_distributed(args):
        raise UsageError("--packed runs in one process (no --pp/--dp-shard/--dp-replicate)")
    float8 = {config.float8.enabled for config in configs}
    if len(float8) > 1:
        raise UsageError("--packed: give configs that all enable float8, or none")
    peak = resolve_peak_flops(
        spec.device, spec.dtype, float8=float8.pop(), override_tflops=args.peak_tflops
    )
    records, corpus = run_packed_benchmark(
        spec.params,
        configs,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        steps=spec.steps,
        warmup=spec.warmup,
        dtype=spec.dtype,
        device=spec.device,
        peak=peak,
        seed=spec.seed,
    )
    print(format_packed_table(records, corpus))
    if args.json is not None:
        write_packed_json(args.json, records, corpus)
    return []


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        records = run(args, _Output(args.json))
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
    failed = [r for r in records if r.status in ("out of memory", "failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
