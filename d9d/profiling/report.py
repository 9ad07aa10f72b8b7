"""The result of benchmarking one compile preset, and the table that prints them.

One :class:`ProfileRecord` per config; ``--json`` writes ``[record.model_dump(), ...]``.
All rates are **per device** (under ``torchrun``: per rank), so MFU compares with the
peak of one device.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict
from tabulate import tabulate


class ProfileRecord(BaseModel):
    """Everything measured for one config.

    Attributes:
        config: Compile preset name.
        model_preset: Model preset name.
        model: The model parameters (``Qwen3DenseForCausalLMParameters`` as a dict).
        device: ``cpu``, ``cuda:0``, ...
        device_name: Product name of the device (CPU model or GPU name).
        dtype: Parameter and compute dtype of the run.
        float8: Whether float8 linears were enabled.
        batch_size: Sequences per step (per data-parallel rank).
        seq_len: Tokens per sequence.
        world_size: Number of processes.
        num_threads: Intra-op CPU threads.
        steps: Measured steps.
        warmup: Warm-up steps (the first one compiles).
        optimizer: Optimizer and its implementation path.
        tokens_per_second: Trained tokens per second per device (median step).
        model_flops_per_token: ``6 N + 12 L H head_dim S`` (see ``flops.py``).
        matmul_flops_per_token: The ``6 N`` term.
        attention_flops_per_token: The attention term.
        achieved_flops_per_second: ``tokens_per_second * model_flops_per_token``.
        peak_flops_per_second: The peak MFU is divided by.
        peak_flops_dtype: The dtype of that peak (bf16 for float8 runs).
        peak_flops_source: Where the peak comes from (datasheet, measured, user).
        mfu: ``achieved_flops_per_second / peak_flops_per_second`` (a fraction).
        peak_memory_bytes: Peak tensor memory of a step.
        resident_memory_bytes: Tensor memory held between steps.
        step_peak_memory_bytes: What a step adds on top of the resident memory.
        activation_memory_bytes: What one forward of the backbone (embedding and
            layers, not the head) leaves allocated for its backward: the activation
            memory that checkpoint policies trade (single-process runs; ``None`` under
            torchrun).
        memory_source: How memory was measured.
        first_step_seconds: Wall time of the first step (includes compile).
        step_seconds_median: Median wall time of the measured steps.
        optimizer_seconds_median: Median time of ``optimizer.step()`` + ``zero_grad()``.
        optimizer_fraction: ``optimizer_seconds_median / step_seconds_median``.
        graph_breaks: Dynamo graph breaks during the run.
        recompiles: Dynamo recompilations during the run.
        compiled_graphs: Graphs dynamo compiled during the run.
        compile_cache: ``"cold"``: the first step compiled into an empty inductor cache;
            ``"warm"``: it could reuse kernels cached on disk by an earlier run.
        loss_first: Loss of the first step (sanity: about ln(vocab) at init); ``None``
            where the process does not hold the last pipeline stage.
        loss_last: Loss of the last measured step (same caveat).
        torch_version: ``torch.__version__``.
    """

    model_config = ConfigDict(extra="forbid")

    config: str
    model_preset: str
    model: dict[str, Any]
    device: str
    device_name: str
    dtype: str
    float8: bool
    batch_size: int
    seq_len: int
    world_size: int
    num_threads: int
    steps: int
    warmup: int
    optimizer: str
    tokens_per_second: float
    model_flops_per_token: int
    matmul_flops_per_token: int
    attention_flops_per_token: int
    achieved_flops_per_second: float
    peak_flops_per_second: float
    peak_flops_dtype: str
    peak_flops_source: str
    mfu: float
    peak_memory_bytes: int
    resident_memory_bytes: int
    step_peak_memory_bytes: int
    activation_memory_bytes: int | None = None
    memory_source: str
    first_step_seconds: float
    step_seconds_median: float
    optimizer_seconds_median: float
    optimizer_fraction: float
    graph_breaks: int
    recompiles: int
    compiled_graphs: int
    compile_cache: str
    loss_first: float | None
    loss_last: float | None
    torch_version: str


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def format_table(records: list[ProfileRecord]) -> str:
    """Renders the records as one table plus footnotes naming the peak and memory sources.

    Args:
        records: One record per config, all from the same run.

    Returns:
        The text to print.
    """
    headers = [
        "config",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak mem",
        "layer act mem",
        "first step s",
        "median step s",
        "optim share",
        "graph breaks",
        "recompiles",
    ]
    rows = []
    for rec in records:
        mfu = f"{rec.mfu:.1%}" + (" (vs bf16)" if rec.float8 else "")
        rows.append(
            [
                rec.config,
                f"{rec.tokens_per_second:,.0f}",
                f"{rec.achieved_flops_per_second / 1e12:.3f}",
                mfu,
                _mib(rec.peak_memory_bytes),
                "-" if rec.activation_memory_bytes is None else _mib(rec.activation_memory_bytes),
                f"{rec.first_step_seconds:.2f}",
                f"{rec.step_seconds_median:.3f}",
                f"{rec.optimizer_fraction:.1%}",
                rec.graph_breaks,
                rec.recompiles,
            ]
        )
    lines = [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if records:
        first = records[0]
        lines.append("")
        per_rank = " per data-parallel rank" if first.world_size > 1 else ""
        lines.append(
            f"model {first.model_preset}, batch {first.batch_size}{per_rank} x seq "
            f"{first.seq_len}, {first.dtype}, {first.device} ({first.device_name}), world size "
            f"{first.world_size}, threads {first.num_threads}, {first.optimizer}; "
            "rates are per device"
        )
        lines.append(
            f"model FLOPs/token {first.model_flops_per_token:,} = 6N "
            f"{first.matmul_flops_per_token:,} + attention {first.attention_flops_per_token:,}"
        )
        lines.append(
            "first step: includes compile into an empty inductor cache (--cold-compile)"
            if first.compile_cache == "cold"
            else "first step: includes compile, reusing kernels an earlier run cached on disk "
            "(--cold-compile for the full cost)"
        )
        for source in dict.fromkeys(rec.peak_flops_source for rec in records):
            lines.append(f"peak: {source}")
        for source in dict.fromkeys(rec.memory_source for rec in records):
            lines.append(f"memory: {source}")
        lines.append(
            "layer act mem: memory a forward of the embedding and layers leaves allocated "
            "for backward (what checkpointing trades), measured like peak mem"
        )
    return "\n".join(lines)
