"""The harness under ``torchrun``: FSDP2 per layer inside pipeline stages, per-device rates.

Every rank builds its pipeline stage with the training stack's builder and steps it
through the one step object (``benchmark.HarnessTrainer``): without pipelining the single
stage (FSDP2 reduces the gradients), with ``pp > 1`` a 1F1B schedule over
``n_microbatches``; the single-process measuring loop of ``benchmark.py`` drives it.

Rates are **per device**: the global batch (``batch_size`` per data-parallel rank) is
divided by the world size (tensor-parallel ranks work on the same tokens, so their
FLOPs are divided by the TP degree; context-parallel ranks each train on ``1 / cp`` of
every row's tokens), so tokens/s and MFU read the same way as on one device and
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

from d9d.compile import CompileConfig
from d9d.core.dist_context import DeviceMeshParameters
from d9d.metrics.peak import PeakFlops, resolve_peak_flops
from d9d.module.parallelism.context_parallel import check_context_parallel_seq_len
from d9d.profiling.benchmark import BenchmarkSpec, HarnessTrainer, iter_configs
from d9d.profiling.report import ProfileRecord, Record


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
    mesh: DeviceMeshParameters,
    *,
    n_microbatches: int | None = None,
    peak_tflops: float | None = None,
) -> Iterator[Record]:
    """Benchmarks every config on every rank; yields the merged records on rank 0.

    Args:
        spec: The run (``batch_size`` per data-parallel rank).
        configs: Compile presets, in order.
        mesh: The parallel layout.
        n_microbatches: Pipeline microbatches (``None``: one per pipeline stage).
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
            f"{mesh.world_size} profiling/mfu.py ..."
        )
    # Before any communication: every rank cuts the same rows into 2 x cp chunks.
    cp = mesh.context_parallel_shard * mesh.context_parallel_replicate
    check_context_parallel_seq_len(spec.seq_len, cp, "--seq-len")
    if spec.device.type == "cpu" and not dist.is_initialized():
        # DeviceMeshParameters.build() would pick an accelerator if there is one.
        dist.init_process_group("gloo")
    dist_context = mesh.build()
    device = dist_context.device
    spec = dataclasses.replace(spec, device=device)
    pp = mesh.pipeline_parallel
    n_microbatches = n_microbatches or pp
    if pp > 1 and spec.batch_size % n_microbatches:
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
        lambda config: HarnessTrainer(spec, config, dist_context, n_microbatches if pp > 1 else 1),
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
