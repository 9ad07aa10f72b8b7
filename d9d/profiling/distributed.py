"""The harness under ``torchrun``: FSDP2 per layer inside pipeline stages, per-device rates.

Every rank builds its pipeline stage the way the training stack does (meta -> dtype ->
compile preset -> ``parallelize_qwen3_dense_for_causal_lm`` -> ``to_empty`` +
``reset_parameters()``), then the single-process measuring loop of ``benchmark.py``
drives it: without pipelining a plain forward/backward (FSDP2 reduces the gradients),
with ``pp > 1`` a 1F1B schedule over ``n_microbatches``.

Rates are **per device**: the global batch (``batch_size`` per data-parallel rank) is
divided by the world size (tensor-parallel ranks work on the same tokens, so their
FLOPs are divided by the TP degree; context-parallel ranks each train on ``1 / cp`` of
every row's tokens, sharded by ``shard_batch_for_context_parallel``), so tokens/s and MFU
read the same way as on one device and
are directly comparable with the single-device table. Rank 0 merges the ranks' records:
the slowest rank's step time (the others wait for it), the largest peak memory, the
largest graph-break and recompile counts, and the loss from the last stage.

A preset this machine cannot run is skipped on every rank alike (the check is the same
everywhere); a failure inside a config is not contained here, since a rank carrying on
alone would wait forever in its peers' collectives: rank 0 has printed the finished
rows by then.
"""

import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from d9d.compile import CompileConfig
from d9d.core.dist_context import DeviceMeshParameters, DistributedContext
from d9d.module.parallelism.context_parallel import (
    check_context_parallel_seq_len,
    shard_batch_for_context_parallel,
)
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.schedule import build_pipeline_schedule
from d9d.profiling.benchmark import (
    BenchmarkSpec,
    float8_summary,
    iter_configs,
    make_adamw,
    synthetic_batch,
    with_precision,
)
from d9d.profiling.peak import PeakFlops, resolve_peak_flops
from d9d.profiling.report import ProfileRecord, Record
from d9d.stack import build_stage_modules


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How the harness splits the world under ``torchrun``.

    Attributes:
        pp: Pipeline stages.
        dp_shard: FSDP shard degree.
        dp_replicate: HSDP replicas.
        tp: Tensor-parallel degree.
        cp: Context-parallel degree whose ranks also shard the weights.
        cp_replicate: Context-parallel degree whose ranks replicate the weights.
        microbatches: Pipeline microbatches (``None``: one per stage).
    """

    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    tp: int = 1
    cp: int = 1
    cp_replicate: int = 1
    microbatches: int | None = None

    @property
    def world_size(self) -> int:
        """The number of processes the layout needs."""
        return self.pp * self.dp_shard * self.dp_replicate * self.tp * self.cp * self.cp_replicate


class DistributedTrainer:
    """This rank's pipeline stage, FSDP2-sharded, with its AdamW and its data shard."""

    def __init__(
        self,
        spec: BenchmarkSpec,
        dist_context: DistributedContext,
        compile_config: CompileConfig,
        n_microbatches: int,
    ):
        """Builds the stage with ``d9d.stack.build_stage_modules`` (+ 1F1B for ``pp > 1``).

        Args:
            spec: The run (``batch_size`` is per data-parallel rank).
            dist_context: The distributed context.
            compile_config: The compile preset.
            n_microbatches: Pipeline microbatches (ignored without pipelining).
        """
        compile_config, param_dtype, self.precision = with_precision(spec, compile_config)
        stack = build_stage_modules(
            spec.params, compile_config, dist_context, param_dtype=param_dtype, seed=spec.seed
        )
        (model,) = stack.modules
        (stage,) = stack.infos
        self.float8_summary = float8_summary(stack.reports[0])
        self.module = model
        if dist_context.is_main_process:
            # What tensor parallelism and FSDP2 save: the parameters this rank stores.
            local_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
            print(
                f"parameter memory on rank 0: {local_bytes / 2**20:.2f} MiB (local shards)",
                file=sys.stderr,
                flush=True,
            )
        optimizer, self.optimizer_label = make_adamw(model.parameters())
        self.optimizers = [optimizer]
        # Each data-parallel rank reads its own samples; pipeline, tensor- and
        # context-parallel peers read the same, and each CP rank keeps its tokens.
        shard_spec = dataclasses.replace(spec, seed=spec.seed + dist_context.dp_rank)
        input_ids, labels = synthetic_batch(shard_spec)
        self.batch = shard_batch_for_context_parallel(
            {"input_ids": input_ids, "labels": labels},
            dist_context.cp_rank,
            dist_context.cp_size,
        )
        # Ranks holding different tokens: each holds the same number of them here.
        self.token_shards = dist_context.dp_size * dist_context.cp_size
        self.schedule = None
        if dist_context.pp_size > 1:
            self.schedule = build_pipeline_schedule(
                dist_context, [model], [stage], self.batch, n_microbatches, CausalLMLoss()
            )
        if self.schedule is None:
            # One backbone forward for the activation-memory probe (as in one process).
            self.forward_only = self._forward_only

    def forward_backward(self) -> torch.Tensor | None:
        """One step's forward and backward; the loss where this rank sees it."""
        if self.schedule is not None:
            result = self.schedule.step(self.batch)
            return result.loss
        out = self.module(**self.batch)
        # Gradients are summed over data- and context-parallel ranks, so normalise by the
        # global token count (every rank holds the same number of valid tokens here): the
        # gradient is then the single-device one, as under the pipeline schedule's loss.
        loss = out["logps"].mean() / self.token_shards
        loss.backward()
        return loss.detach() * self.token_shards

    def _forward_only(self) -> dict[str, torch.Tensor]:
        # What this rank's layers keep for backward (every rank calls it together: the
        # collectives of FSDP, TP and CP run inside).
        inputs = {k: v for k, v in self.batch.items() if k in ("input_ids", "position_ids")}
        out = self.module.model(**inputs)
        # The final norm's unit (with the head) stays unsharded after forward for the
        # backward: parameter memory, not activations (one process holds it anyway).
        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return out

    def optimizer_step(self) -> None:
        """AdamW step, then gradients to ``None``."""
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _agreed_peak(peak: PeakFlops, device: torch.device) -> PeakFlops:
    # Ranks measuring a CPU peak concurrently disagree a little; every rank must divide
    # by the same number, and the best sample is the least disturbed one.
    best = torch.tensor([peak.flops_per_second], dtype=torch.float64, device=device)
    dist.all_reduce(best, op=dist.ReduceOp.MAX)
    value = float(best.item())
    if not peak.measured:
        return peak
    source = f"{peak.source}; max over {dist.get_world_size()} ranks: {value / 1e12:.3f} TFLOP/s"
    return PeakFlops(value, peak.dtype, source, peak.measured)


def _merge(records: list[ProfileRecord]) -> ProfileRecord:
    slowest = max(records, key=lambda r: r.step_seconds_median)
    with_loss = [r for r in records if r.loss_first is not None]
    activations = [r.activation_memory_bytes for r in records if r.activation_memory_bytes]
    return slowest.model_copy(
        update={
            "peak_memory_bytes": max(r.peak_memory_bytes for r in records),
            "resident_memory_bytes": max(r.resident_memory_bytes for r in records),
            "step_peak_memory_bytes": max(r.step_peak_memory_bytes for r in records),
            "activation_memory_bytes": max(activations) if activations else None,
            "first_step_seconds": max(r.first_step_seconds for r in records),
            "graph_breaks": max(r.graph_breaks for r in records),
            "recompiles": max(r.recompiles for r in records),
            "compiled_graphs": max(r.compiled_graphs for r in records),
            "loss_first": with_loss[0].loss_first if with_loss else None,
            "loss_last": with_loss[0].loss_last if with_loss else None,
            "memory_source": slowest.memory_source + " (max over ranks)",
        }
    )


def iter_distributed(
    spec: BenchmarkSpec,
    configs: Sequence[CompileConfig],
    layout: ParallelLayout,
    *,
    peak_tflops: float | None = None,
) -> Iterator[Record]:
    """Benchmarks every config on every rank; yields the merged records on rank 0.

    Args:
        spec: The run (``batch_size`` per data-parallel rank).
        configs: Compile presets, in order.
        layout: The parallel layout.
        peak_tflops: An explicit peak per device (``--peak-tflops``).

    Yields:
        On rank 0, one record per config as soon as every rank has finished it; nothing
        on the other ranks. The process group is destroyed at the end.

    Raises:
        ValueError: When not launched by ``torchrun``, or the mesh does not match the
            world size, or the batch does not split into the microbatches.
    """
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--pp/--dp-shard/--dp-replicate/--tp/--cp need torchrun: torchrun --nproc-per-node "
            f"{layout.world_size} profiling/mfu.py ..."
        )
    # Before any communication: every rank cuts the same rows into 2 x cp chunks.
    check_context_parallel_seq_len(spec.seq_len, layout.cp * layout.cp_replicate, "--seq-len")
    if spec.device.type == "cpu" and not dist.is_initialized():
        # DeviceMeshParameters.build() would pick an accelerator if there is one.
        dist.init_process_group("gloo")
    dist_context = DeviceMeshParameters(
        pipeline_parallel=layout.pp,
        data_parallel_shard=layout.dp_shard,
        data_parallel_replicate=layout.dp_replicate,
        tensor_parallel=layout.tp,
        context_parallel_shard=layout.cp,
        context_parallel_replicate=layout.cp_replicate,
    ).build()
    device = dist_context.device
    spec = dataclasses.replace(spec, device=device)
    n_microbatches = layout.microbatches or layout.pp
    if layout.pp > 1 and spec.batch_size % n_microbatches:
        raise ValueError(
            f"--batch-size {spec.batch_size} does not split into {n_microbatches} microbatches"
        )
    rank, world_size = dist_context.rank, dist_context.world_size
    tokens_per_step = spec.batch_size * spec.seq_len * dist_context.dp_size / world_size

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    def peak_for(config: CompileConfig) -> PeakFlops:
        peak = resolve_peak_flops(
            device, spec.dtype, float8=config.float8.enabled, override_tflops=peak_tflops
        )
        return _agreed_peak(peak, device)

    records = iter_configs(
        spec,
        configs,
        lambda config: DistributedTrainer(spec, dist_context, config, n_microbatches),
        peak_for,
        contain_failures=False,
        log=log,
        world_size=world_size,
        rank=rank,
        tokens_per_step=tokens_per_step,
    )
    for record in records:
        if not isinstance(record, ProfileRecord):  # skipped alike on every rank
            if rank == 0:
                yield record
            continue
        gathered: list[ProfileRecord | None] = [None] * world_size if rank == 0 else []
        dist.gather_object(record, gathered if rank == 0 else None, dst=0)
        if rank == 0:
            yield _merge([r for r in gathered if r is not None])
    dist.barrier()
    dist.destroy_process_group()
