"""The result of benchmarking one compile preset, and the table that prints them.

One :class:`ProfileRecord` per config that ran, one :class:`SkippedRecord` per config
that could not (unsupported here, or out of memory); ``--json`` writes
``[record.model_dump(), ...]`` and every entry has a ``status``. All rates are **per
device** (under ``torchrun``: per rank), so MFU compares with the peak of one device.

The table is built to be streamed: :func:`table_header` first, then one
:func:`table_row` as each config finishes (so a later failure cannot lose the rows
already measured), then :func:`table_footer`. :func:`format_table` is the three at once.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ProfileRecord(BaseModel):
    """Everything measured for one config.

    Attributes:
        status: Always ``"ok"`` (a config that did not run is a :class:`SkippedRecord`).
        config: Compile preset name.
        model_preset: Model preset name.
        model: The model parameters (``Qwen3DenseForCausalLMParameters`` as a dict).
        device: ``cpu``, ``cuda:0``, ...
        device_name: Product name of the device (CPU model or GPU name).
        dtype: Compute dtype of the run.
        precision: How parameters, compute and gradient reductions are typed (pure
            ``dtype``, or mixed: fp32 parameters and optimizer, ``dtype`` compute, fp32
            reductions).
        float8: Whether float8 linears were enabled.
        float8_summary: What the float8 conversion converted and kept in high precision,
            and why (``None`` without float8).
        float8_gemms: ``"emulated: no float8 GEMM on this device"`` (the recipe's casts
            and scales, GEMMs in the compute dtype) or ``"native float8 GEMMs"``
            (``None`` without float8).
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
        peak_flops_dtype: The dtype of that peak (for float8 runs, the dtype the run otherwise
            computes in).
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

    status: Literal["ok"] = "ok"
    config: str
    model_preset: str
    model: dict[str, Any]
    device: str
    device_name: str
    dtype: str
    precision: str = ""
    float8: bool
    float8_summary: str | None = None
    float8_gemms: str | None = None
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


class SkippedRecord(BaseModel):
    """A config that did not produce measurements, and why.

    Attributes:
        status: ``"skipped"`` (checked up front: this machine cannot run it),
            ``"out of memory"`` or ``"failed"`` (it started and raised).
        config: Compile preset name.
        reason: One line: what is missing or what was raised.
        model_preset: Model preset name.
        device: ``cpu``, ``cuda:0``, ...
        dtype: Compute dtype of the run.
        float8: Whether the preset enables float8 linears.
    """

    model_config = ConfigDict(extra="forbid")

    status: Literal["skipped", "out of memory", "failed"]
    config: str
    reason: str
    model_preset: str
    device: str
    dtype: str
    float8: bool


Record = ProfileRecord | SkippedRecord
"""One row of the table."""


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


# Fixed widths (at least the header's): a row is printed the moment its config finishes,
# before the later rows' values are known. A longer value only shifts its own row, which
# a Markdown renderer does not mind.
_COLUMNS: tuple[tuple[str, int], ...] = (
    ("config", 26),
    ("tokens/s", 10),
    ("TFLOP/s", 8),
    ("MFU", 20),  # "100.0% (vs bfloat16)"
    ("peak mem", 11),
    ("layer act mem", 13),
    ("first step s", 12),
    ("median step s", 13),
    ("optim share", 11),
    ("graph breaks", 12),
    ("recompiles", 10),
)


def _line(cells: list[str]) -> str:
    padded = [f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=True)]
    return "| " + " | ".join(padded) + " |"


def table_header() -> str:
    """The two header lines of the table (GitHub Markdown)."""
    rule = "|" + "|".join("-" * (width + 2) for _, width in _COLUMNS) + "|"
    return _line([name for name, _ in _COLUMNS]) + "\n" + rule


def table_row(rec: Record) -> str:
    """One config's row; a skipped config shows its status (the reason is a footnote)."""
    if isinstance(rec, SkippedRecord):
        return _line([rec.config, rec.status] + ["-"] * (len(_COLUMNS) - 2))
    mfu = f"{rec.mfu:.1%}" + (f" (vs {rec.peak_flops_dtype})" if rec.float8 else "")
    return _line(
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
            str(rec.graph_breaks),
            str(rec.recompiles),
        ]
    )


def table_footer(records: list[Record], notes: list[str] | tuple[str, ...] = ()) -> str:
    """The footnotes: run settings, FLOPs convention, peak and memory sources, skips.

    Args:
        records: Every row of the table.
        notes: Extra lines for the end (e.g. that another dtype would be faster here).
    """
    lines: list[str] = []
    measured = [rec for rec in records if isinstance(rec, ProfileRecord)]
    if measured:
        first = measured[0]
        lines.append("")
        per_rank = " per data-parallel rank" if first.world_size > 1 else ""
        precision = f" ({first.precision})" if first.precision else ""
        by_optimizer: dict[str, list[str]] = {}
        for rec in measured:
            by_optimizer.setdefault(rec.optimizer, []).append(rec.config)
        optimizers = (
            first.optimizer
            if len(by_optimizer) == 1
            else "; ".join(f"{name} ({', '.join(cfgs)})" for name, cfgs in by_optimizer.items())
        )
        lines.append(
            f"model {first.model_preset}, batch {first.batch_size}{per_rank} x seq "
            f"{first.seq_len}, {first.dtype}{precision}, {first.device} ({first.device_name}), "
            f"world size {first.world_size}, threads {first.num_threads}, {optimizers}; "
            "rates are per device"
        )
        lines.append(
            f"model FLOPs/token {first.model_flops_per_token:,} = 6N "
            f"{first.matmul_flops_per_token:,} + attention {first.attention_flops_per_token:,}"
        )
        lines.append(
            "first step: includes compile into an empty inductor cache (--cold-compile)"
            if first.compile_cache == "cold"
            else "first step: includes compile; kernels already in the inductor cache on disk "
            "are reused (--cold-compile: an empty cache per config, the full cost)"
        )
        for source in dict.fromkeys(rec.peak_flops_source for rec in measured):
            lines.append(f"peak: {source}")
        for source in dict.fromkeys(rec.memory_source for rec in measured):
            lines.append(f"memory: {source}")
        lines.append(
            "layer act mem: memory a forward of the embedding and layers leaves allocated "
            "for backward (what checkpointing trades), measured like peak mem"
        )
        for rec in measured:
            if rec.float8_summary:
                gemms = f" ({rec.float8_gemms})" if rec.float8_gemms else ""
                lines.append(f"float8{gemms} in {rec.config}: {rec.float8_summary}")
    skipped = [rec for rec in records if isinstance(rec, SkippedRecord)]
    if skipped and not measured:
        lines.append("")
    for rec in skipped:
        lines.append(f"{rec.status}: {rec.config}: {rec.reason}")
    lines.extend(notes)
    return "\n".join(lines)


def format_table(records: list[Record], notes: list[str] | tuple[str, ...] = ()) -> str:
    """Renders the records as one table plus footnotes naming the peak and memory sources.

    Args:
        records: One record per config, all from the same run.
        notes: Extra footnotes.

    Returns:
        The text to print (the same text a streamed run prints piece by piece).
    """
    lines = [table_header(), *(table_row(rec) for rec in records)]
    footer = table_footer(records, notes)
    return "\n".join(lines) + ("\n" + footer if footer else "")
