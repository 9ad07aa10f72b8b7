"""Real training steps on synthetic tokens, measured: the engine of ``profiling/mfu.py``.

One call of :func:`run_benchmark` benchmarks one compile preset on a fresh model:

1. dynamo's caches and counters are reset (so graph breaks and recompiles are per config);
2. the model is built on ``meta``, cast to the run's dtype, the compile preset is applied
   (float8, activation checkpointing, regional compile), then it is materialised with
   ``to_empty`` + ``reset_parameters()`` — the same order as the training stack;
3. ``warmup`` steps run (the first one compiles and is timed on its own), then ``steps``
   measured steps. A step is: forward, ``loss.backward()``, ``optimizer.step()``,
   ``optimizer.zero_grad(set_to_none=True)``, with AdamW compiled under a compile preset
   (``[compile] optimizer``, ``d9d.compile.optimizer``), else on its fused path (foreach
   where fused is unavailable);
4. memory is read (CUDA statistics, or the CPU substitute of ``memory.py``); an optional
   ``torch.profiler`` Chrome trace covers a few more steps.

:func:`iter_configs` runs several presets one after another: a preset this machine
cannot run is a skipped record (checked up front), an out-of-memory (or any failure) in
one preset is a record too, and the previous preset's model and optimizer state are
garbage-collected before the next one is built.

Precision: with ``mixed_precision`` (the harness's default on a GPU) parameters and AdamW
state are fp32, FSDP2 casts them to the run's dtype for compute and reduces gradients in
fp32 (``MixedPrecisionPolicy``; one process runs FSDP2 on a world of one), the setting
torchtitan reports its MFU with. Without it parameters, gradients and AdamW state are all
in the run's dtype (pure bf16: no fp32 master copy), which keeps CPU runs small.
The synthetic batch is one fixed random batch: token values do not change the work.
"""

import contextlib
import dataclasses
import gc
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch._inductor.utils import fresh_cache
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function

from d9d.compile import CompileConfig, CompileReport
from d9d.compile.optimizer import build_adamw
from d9d.core.dist_context import DistributedContext
from d9d.core.log_filters import quiet_profiler_markers
from d9d.metrics.compile_stats import read_compile_stats, reset_compile_state
from d9d.metrics.device import device_name
from d9d.metrics.flops import training_flops_per_token
from d9d.metrics.memory import (
    CudaPeakMemory,
    measure_cpu_step_memory,
    retained_forward_bytes,
)
from d9d.metrics.peak import PeakFlops, dtype_name
from d9d.metrics.timers import DeviceClock, StepTimes
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLMParameters
from d9d.module.parallelism.context_parallel import shard_batch_for_context_parallel
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import build_schedule
from d9d.profiling.report import ProfileRecord, Record, SkippedRecord
from d9d.profiling.support import unsupported_reason
from d9d.stack import build_stage_modules
from d9d.train.mixed_precision import resolve_precision


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to run, shared by every config of one harness invocation.

    Attributes:
        model_preset: Name of the model shape (for the report).
        params: The causal-LM parameters.
        batch_size: Sequences per step (per data-parallel rank).
        seq_len: Tokens per sequence.
        steps: Measured steps.
        warmup: Warm-up steps before them (>= 1: the first step compiles).
        dtype: Parameter and compute dtype.
        device: Device to run on.
        trace_dir: Where to write a Chrome trace per config (``None``: no trace).
        trace_steps: Steps covered by the trace.
        seed: Seed for the weights and the synthetic batch.
        cold_compile: Compile each config into a fresh, empty inductor cache, so that the
            first step shows the full compile cost (otherwise kernels cached on disk by
            an earlier run are reused and the first step shows mostly tracing).
        mixed_precision: fp32 parameters and AdamW state, compute in ``dtype``, gradients
            reduced in fp32 (FSDP2 ``MixedPrecisionPolicy``). ``False``: everything in
            ``dtype``.
    """

    model_preset: str
    params: Qwen3DenseForCausalLMParameters
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    dtype: torch.dtype
    device: torch.device
    trace_dir: Path | None = None
    trace_steps: int = 3
    seed: int = 0
    cold_compile: bool = False
    mixed_precision: bool = False


def validate_spec(spec: BenchmarkSpec) -> None:
    """Rejects a spec that cannot run, before anything is built.

    Raises:
        ValueError: For a non-positive size or count, a sequence longer than the model's
            ``max_position_ids``, or a device type the harness does not support.
    """
    for name in ("batch_size", "seq_len", "steps", "warmup", "trace_steps"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    max_pos = spec.params.model.max_position_ids
    if spec.seq_len > max_pos:
        raise ValueError(
            f"seq_len {spec.seq_len} exceeds the model's max_position_ids={max_pos} "
            f"(model preset '{spec.model_preset}')"
        )
    if spec.device.type not in ("cpu", "cuda"):
        raise ValueError(f"device type '{spec.device.type}' is not supported (cpu or cuda)")
    if spec.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec.device} requested but CUDA is not available")


class Trainer(Protocol):
    """One training setup the measuring loop can drive (single process or distributed)."""

    module: nn.Module
    optimizers: list[torch.optim.Optimizer]

    def forward_backward(self) -> torch.Tensor | None:
        """Runs forward and backward of one step; returns the detached loss.

        ``None`` where this process does not see the loss (a pipeline stage before the
        last).
        """
        ...

    def optimizer_step(self) -> None:
        """Steps and zeroes every optimizer."""
        ...


def make_adamw(
    params, lr: float = 1e-4, *, compile_config: CompileConfig | None = None
) -> tuple[torch.optim.Optimizer, str]:
    """AdamW as the preset asks: compiled under a compile preset, else fused (or foreach).

    Returns:
        The optimizer and a label of the path taken (for the report).
    """
    section = (compile_config or CompileConfig()).compile
    return build_adamw(params, lr=lr, compiled=section.compiles_optimizer, backend=section.backend)


def float8_summary(report: CompileReport | None) -> str | None:
    """One line on what float8 converted and what it kept in high precision, and why.

    Linears of every layer are grouped (``layers.*.self_attn.k_proj x28``), so the line
    stays short for a deep model. ``None`` when float8 was not applied.
    """
    if report is None or report.float8 is None:
        return None
    groups: dict[tuple[str, str], int] = {}
    for fqn, reason in report.float8.skipped.items():
        key = (re.sub(r"\.\d+\.", ".*.", fqn), reason)
        groups[key] = groups.get(key, 0) + 1
    kept = "; ".join(
        f"{name}{f' x{count}' if count > 1 else ''}: {reason}"
        for (name, reason), count in groups.items()
    )
    return (
        f"converted {len(report.float8.converted)} linears, kept "
        f"{len(report.float8.skipped)} in high precision" + (f" ({kept})" if kept else "")
    )


def float8_gemms(report: CompileReport | None) -> str | None:
    """``"emulated: no float8 GEMM on this device"`` / ``"native float8 GEMMs"`` (or ``None``)."""
    if report is None or report.float8 is None:
        return None
    return report.float8.gemms


def synthetic_batch(spec: BenchmarkSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``input_ids`` and ``labels`` of shape ``(batch_size, seq_len)``."""
    generator = torch.Generator().manual_seed(spec.seed)
    vocab = spec.params.model.vocab_size
    shape = (spec.batch_size, spec.seq_len)
    input_ids = torch.randint(0, vocab, shape, generator=generator)
    labels = torch.randint(0, vocab, shape, generator=generator)
    return input_ids.to(spec.device), labels.to(spec.device)


class HarnessTrainer:
    """This rank's stages as the training stack builds them, AdamW, and a synthetic batch.

    One process (``dist_context=None``) or one rank under ``torchrun``; the steps run
    through the one step object (``d9d.pipelining.step.build_schedule``: the single stage,
    or a 1F1B pipeline schedule), so the loss is normalised as in training.
    """

    def __init__(
        self,
        spec: BenchmarkSpec,
        compile_config: CompileConfig | None,
        dist_context: DistributedContext | None = None,
        n_microbatches: int = 1,
    ):
        """Builds the stages with ``d9d.stack.build_stage_modules``, AdamW and the step.

        Args:
            spec: The run (``batch_size`` is per data-parallel rank).
            compile_config: The compile preset, or ``None`` for plain eager.
            dist_context: The distributed context (``None``: one process).
            n_microbatches: Microbatches per step (pipeline microbatches under ``pp``).
        """
        precision = resolve_precision(compile_config, spec.dtype, mixed=spec.mixed_precision)
        self.precision = precision.label
        stack = build_stage_modules(
            spec.params,
            precision.compile_config,
            dist_context,
            param_dtype=precision.param_dtype,
            device=None if dist_context is not None else spec.device,
            seed=spec.seed,
        )
        (model,) = stack.modules
        self.float8_summary = float8_summary(stack.reports[0])
        self.float8_gemms = float8_gemms(stack.reports[0])
        self.module = model
        # The activation-memory probe runs the whole backbone in one forward call.
        self.measures_activations = len(stack.modules) == 1 and stack.infos[0].num_stages == 1
        if dist_context is not None and dist_context.is_main_process:
            # What tensor parallelism and FSDP2 save: the parameters this rank stores.
            local_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
            print(
                f"parameter memory on rank 0: {local_bytes / 2**20:.2f} MiB (local shards)",
                file=sys.stderr,
                flush=True,
            )
        optimizer, self.optimizer_label = make_adamw(
            model.parameters(), compile_config=precision.compile_config
        )
        self.optimizers = [optimizer]
        # Each data-parallel rank reads its own samples; pipeline, TP and CP peers the
        # same, and each CP rank keeps its head-tail share of every row.
        dp_rank = dist_context.dp_rank if dist_context is not None else 0
        input_ids, labels = synthetic_batch(dataclasses.replace(spec, seed=spec.seed + dp_rank))
        self.batch = {"input_ids": input_ids, "labels": labels}
        if dist_context is not None:
            self.batch = shard_batch_for_context_parallel(
                self.batch, dist_context.cp_rank, dist_context.cp_size
            )
        self.schedule = build_schedule(
            stack.dist_context,
            stack.modules,
            stack.infos,
            self.batch,
            n_microbatches,
            CausalLMLoss(),
        )

    def forward_backward(self) -> torch.Tensor:
        """One step's forward and backward; the global mean loss."""
        return self.schedule.step(self.batch).loss

    def forward_only(self) -> dict[str, torch.Tensor]:
        """One backbone forward with autograd on; its output keeps the layers' activations.

        The head is left out: what it keeps (the logits) does not depend on the
        activation-checkpoint policy that this number is there to compare.
        """
        inputs = {k: v for k, v in self.batch.items() if k in ("input_ids", "position_ids")}
        return self.module.model(**inputs)

    def optimizer_step(self) -> None:
        """AdamW step, then gradients to ``None`` (frees them between steps)."""
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _trace(trainer: Trainer, spec: BenchmarkSpec, config_name: str, rank: int) -> Path:
    assert spec.trace_dir is not None
    spec.trace_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".rank{rank}" if rank else ""
    path = spec.trace_dir / f"{config_name}{suffix}.json"
    activities = [ProfilerActivity.CPU]
    if spec.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    quiet_profiler_markers()  # before kineto's first start: no USDT lines
    with profile(activities=activities, record_shapes=True) as prof:
        for index in range(spec.trace_steps):
            with record_function(f"train_step_{index}"):
                with record_function("forward_backward"):
                    trainer.forward_backward()
                with record_function("optimizer"):
                    trainer.optimizer_step()
    prof.export_chrome_trace(str(path))
    return path


def run_benchmark(
    spec: BenchmarkSpec,
    config_name: str,
    make_trainer: Callable[[], Trainer],
    peak: PeakFlops,
    *,
    float8: bool = False,
    world_size: int = 1,
    rank: int = 0,
    tokens_per_step: float | None = None,
    log: Callable[[str], None] = _stderr,
) -> ProfileRecord:
    """Benchmarks one config: builds a fresh trainer, runs and measures its steps.

    Args:
        spec: The run.
        config_name: Name of the compile preset (for progress lines and the report).
        make_trainer: Builds the model and optimizer with the preset applied. Called
            after dynamo is reset, so that compile counters belong to this config.
        peak: The peak FLOP/s MFU is divided by.
        float8: Whether the preset enables float8 (for the report).
        world_size: Number of processes (rates stay per device).
        rank: This process's rank (trace file names).
        tokens_per_step: Tokens one device accounts for per step (default
            ``batch_size * seq_len``; a distributed run divides the global batch by
            the world size, so rates stay per device).
        log: Receives one progress line per step.

    Returns:
        The measurements.

    Raises:
        ValueError: If the spec cannot run (see :func:`validate_spec`).
        RuntimeError: If the loss is not finite.
    """
    validate_spec(spec)
    with fresh_cache() if spec.cold_compile else contextlib.nullcontext():
        reset_compile_state()
        trainer = make_trainer()
        times, losses, cuda_memory = _run_steps(trainer, spec, config_name, log)
        compile_stats = read_compile_stats()
    if cuda_memory is not None:
        memory = cuda_memory.read()
    else:

        def one_step() -> None:
            trainer.forward_backward()
            trainer.optimizer_step()

        memory = measure_cpu_step_memory(one_step, trainer.module, trainer.optimizers, spec.device)
    # Only a trainer that runs the whole model in one forward call can be measured so.
    activation_bytes = (
        retained_forward_bytes(trainer.forward_only, spec.device)
        if getattr(trainer, "measures_activations", False)
        else None
    )
    if spec.trace_dir is not None:
        path = _trace(trainer, spec, config_name, rank)
        log(f"[{config_name}] trace written to {path}")

    flops = training_flops_per_token(spec.params, spec.seq_len)
    if tokens_per_step is None:
        tokens_per_step = spec.batch_size * spec.seq_len
    tokens_per_second = tokens_per_step / times.step_seconds_median
    achieved = tokens_per_second * flops.total
    return ProfileRecord(
        config=config_name,
        model_preset=spec.model_preset,
        model=spec.params.model_dump(),
        device=str(spec.device),
        device_name=device_name(spec.device),
        dtype=dtype_name(spec.dtype),
        precision=getattr(trainer, "precision", ""),
        float8=float8,
        float8_summary=getattr(trainer, "float8_summary", None),
        float8_gemms=getattr(trainer, "float8_gemms", None),
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        world_size=world_size,
        num_threads=torch.get_num_threads(),
        steps=spec.steps,
        warmup=spec.warmup,
        optimizer=getattr(trainer, "optimizer_label", type(trainer.optimizers[0]).__name__),
        tokens_per_second=tokens_per_second,
        model_flops_per_token=flops.total,
        matmul_flops_per_token=flops.matmul,
        attention_flops_per_token=flops.attention,
        achieved_flops_per_second=achieved,
        peak_flops_per_second=peak.flops_per_second,
        peak_flops_dtype=peak.dtype,
        peak_flops_source=peak.source,
        mfu=achieved / peak.flops_per_second,
        peak_memory_bytes=memory.peak_bytes,
        resident_memory_bytes=memory.resident_bytes,
        step_peak_memory_bytes=memory.step_peak_bytes,
        activation_memory_bytes=activation_bytes,
        memory_source=memory.source,
        first_step_seconds=times.first_step_seconds,
        step_seconds_median=times.step_seconds_median,
        optimizer_seconds_median=times.optimizer_seconds_median,
        optimizer_fraction=times.optimizer_seconds_median / times.step_seconds_median,
        graph_breaks=compile_stats.graph_breaks,
        recompiles=compile_stats.recompiles,
        compiled_graphs=compile_stats.graphs,
        compile_cache="cold" if spec.cold_compile else "warm",
        loss_first=losses[0],
        loss_last=losses[-1],
        torch_version=torch.__version__,
    )


def release_memory(device: torch.device) -> None:
    """Frees what a finished config left behind, before the next one is built.

    ``Module.compile`` ties a model into a reference cycle, so its parameters, gradients
    and AdamW state outlive the last reference until the cycle collector runs; on CUDA
    the caching allocator then still holds the freed blocks. Without both, a later config
    is measured (or runs out of memory) with the previous one's tensors resident.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def iter_configs(
    spec: BenchmarkSpec,
    configs: Sequence[CompileConfig],
    make_trainer: Callable[[CompileConfig], Trainer],
    peak_for: Callable[[CompileConfig], PeakFlops],
    *,
    contain_failures: bool = True,
    log: Callable[[str], None] = _stderr,
    **benchmark_kwargs,
) -> Iterator[Record]:
    """Benchmarks ``configs`` one after another, yielding each record as it is finished.

    * A config :func:`~d9d.profiling.support.unsupported_reason` refuses is not built:
      its record says ``skipped`` and why.
    * With ``contain_failures``, an out-of-memory (or any other exception) inside one
      config becomes that config's record (``out of memory`` / ``failed``, the traceback
      on ``log``) and the next config runs. A distributed run passes ``False``: a rank
      that carries on alone would wait forever in its peers' collectives.
    * Memory is released (:func:`release_memory`) after every config.

    Args:
        spec: The run.
        configs: The compile presets, in order.
        make_trainer: Builds a fresh trainer for one preset.
        peak_for: The peak MFU is divided by, for one preset.
        contain_failures: Turn a failure inside a config into its record.
        log: Progress lines.
        **benchmark_kwargs: Passed to :func:`run_benchmark` (``world_size``, ``rank``,
            ``tokens_per_step``).

    Yields:
        One :class:`ProfileRecord` or :class:`SkippedRecord` per config, in order.
    """
    for config in configs:
        float8 = config.float8.enabled

        def skipped(status: str, reason: str, config=config, float8=float8) -> SkippedRecord:
            return SkippedRecord(
                status=status,
                config=config.name,
                reason=reason,
                model_preset=spec.model_preset,
                device=str(spec.device),
                dtype=dtype_name(spec.dtype),
                float8=float8,
            )

        reason = unsupported_reason(config, spec.device)
        if reason is not None:
            log(f"[{config.name}] skipped: {reason}")
            yield skipped("skipped", reason)
            continue
        record: Record
        try:
            record = run_benchmark(
                spec,
                config.name,
                lambda config=config: make_trainer(config),
                peak_for(config),
                float8=float8,
                log=log,
                **benchmark_kwargs,
            )
        except torch.OutOfMemoryError as err:
            if not contain_failures:
                raise
            log(f"[{config.name}] out of memory: {_one_line(err)[:300]}")
            record = skipped("out of memory", _one_line(err)[:300])
        except Exception as err:  # one config's failure must not cost the rest
            if not contain_failures:
                raise
            log(f"[{config.name}] failed:\n{traceback.format_exc().rstrip()}")
            record = skipped("failed", f"{type(err).__name__}: {_one_line(err)[:300]}")
        # The except clauses above dropped the traceback (and with it the failed
        # trainer's frames) before this point.
        release_memory(spec.device)
        yield record


def _run_steps(
    trainer: Trainer, spec: BenchmarkSpec, config_name: str, log: Callable[[str], None]
) -> tuple[StepTimes, list[float | None], CudaPeakMemory | None]:
    """Warm-up and measured steps; CUDA peak memory is bracketed around the measured ones."""
    clock = DeviceClock(spec.device)
    times = StepTimes()
    total = spec.warmup + spec.steps
    losses: list[float | None] = []
    cuda_memory: CudaPeakMemory | None = None
    for index in range(total):
        measured = index >= spec.warmup
        if measured and cuda_memory is None and spec.device.type == "cuda":
            cuda_memory = CudaPeakMemory(spec.device)
        start = clock.now()
        loss = trainer.forward_backward()
        backward_done = clock.now()
        trainer.optimizer_step()
        end = clock.now()
        if index == 0:
            times.first_step_seconds = end - start
        if measured:
            times.add(end - start, end - backward_done)
        losses.append(None if loss is None else float(loss))
        phase = "measured" if measured else ("compile/warmup" if index == 0 else "warmup")
        shown = "on the last stage" if loss is None else f"{losses[-1]:.4f}"
        log(f"[{config_name}] step {index + 1}/{total} ({phase}) {end - start:.3f} s loss {shown}")
    if not all(value is None or math.isfinite(value) for value in losses):
        # A diverged run measures nothing meaningful (and NaN kernels can be slower).
        raise RuntimeError(f"config {config_name}: non-finite loss {losses}")
    return times, losses, cuda_memory
