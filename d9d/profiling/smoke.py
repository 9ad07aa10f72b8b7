"""The GPU smoke run's Python side: its checks and the one summary it prints.

``profiling/gpu_smoke.sh`` runs each step as a separate command with a time limit and
appends one line to ``<out>/steps.tsv``: the step's name, exit status, seconds, its log
file and the ``--json`` records it wrote (``-`` for none). Then
``python -m d9d.profiling.smoke summarize <out>`` reads that folder and prints one
summary a person can paste into the README (device, peak line, and per harness step
MFU, tokens/s, memory, graph breaks, recompiles, skipped rows with their reason), and
exits non-zero when a step failed, a harness row ran out of memory or failed, or a
compiled row had graph breaks or recompiles.

``python -m d9d.profiling.smoke fp32-attention`` is one of the steps: fp32 grouped-query
attention at 4096 tokens on CUDA must run a fused SDPA kernel, not the math kernel that
materialises the ``B x H x S x S`` scores.

``torchrun --nproc-per-node 2 -m d9d.profiling.smoke context-parallel`` is another: two
context-parallel ranks on the one GPU (over gloo: NCCL refuses two ranks on one device)
train a small packed batch through the FlexAttention path (the ``(local queries x all
keys)`` block mask, the K/V all-gather and its reduce-scatter), eager and under
``compile_sac``, and must give the logps and gradients of one process on the same GPU.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

STEPS_FILE = "steps.tsv"
"""Name of the manifest ``gpu_smoke.sh`` appends to, one step per line."""


@dataclass(frozen=True)
class StepResult:
    """One step of the smoke run, as the manifest records it.

    Attributes:
        name: The step's name.
        returncode: Its exit status (124: killed by its time limit).
        seconds: Its wall time.
        log: Its combined stdout/stderr.
        records: The harness records it wrote (empty for a step without ``--json``).
    """

    name: str
    returncode: int
    seconds: float
    log: Path
    records: list[dict]


def read_steps(out_dir: Path) -> list[StepResult]:
    """Reads ``<out_dir>/steps.tsv`` and the JSON records it names.

    A records file that is missing or unreadable (the step died before writing it)
    counts as no records; the step's exit status tells what happened. A step that ran
    more than once (a rerun appended to the same folder) counts by its last run.

    Raises:
        ValueError: If the manifest is missing or a line does not have five fields.
    """
    manifest = out_dir / STEPS_FILE
    if not manifest.is_file():
        raise ValueError(f"no {STEPS_FILE} in {out_dir}: did gpu_smoke.sh run?")
    steps = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5:
            raise ValueError(f"{manifest}:{number}: expected 5 tab-separated fields: {line!r}")
        name, returncode, seconds, log, records_path = fields
        records: list[dict] = []
        if records_path != "-":
            try:
                records = json.loads((out_dir / records_path).read_text())
            except (OSError, json.JSONDecodeError):
                records = []
        steps.append(StepResult(name, int(returncode), float(seconds), out_dir / log, records))
    last = {step.name: step for step in steps}
    return [step for step in steps if last[step.name] is step]


def _log_tail(path: Path, lines: int = 5) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ["(no log)"]
    return [line for line in text.splitlines() if line.strip()][-lines:]


def step_problems(step: StepResult) -> list[str]:
    """What is wrong with one step (empty: it passed).

    A step fails on a non-zero exit status, on a harness row that ran out of memory or
    failed, and on graph breaks or recompiles in a compiled row. A skipped row (float8
    without torchao, ``memory_budget`` on an older torch) is not a failure: the summary
    lists it with its reason.
    """
    problems = []
    if step.returncode == 124:
        problems.append(f"{step.name}: killed by its time limit after {step.seconds:.0f} s")
    elif step.returncode != 0:
        problems.append(f"{step.name}: exit status {step.returncode}")
    for rec in step.records:
        status = rec.get("status", "ok")
        if status in ("out of memory", "failed"):
            problems.append(f"{step.name}/{rec['config']}: {status}: {rec.get('reason', '')}")
        elif status == "ok" and (rec.get("graph_breaks") or rec.get("recompiles")):
            problems.append(
                f"{step.name}/{rec['config']}: {rec['graph_breaks']} graph breaks, "
                f"{rec['recompiles']} recompiles"
            )
    return problems


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _records_table(records: list[dict]) -> list[str]:
    lines = [
        "| config | tokens/s | TFLOP/s | MFU | peak mem | first step s | graph breaks "
        "| recompiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        if rec.get("status", "ok") != "ok":
            lines.append(f"| {rec['config']} | {rec['status']} | - | - | - | - | - | - |")
            continue
        mfu = f"{rec['mfu']:.1%}" + (
            f" (vs {rec.get('peak_flops_dtype')})" if rec.get("float8") else ""
        )
        lines.append(
            f"| {rec['config']} | {rec['tokens_per_second']:,.0f} | "
            f"{rec['achieved_flops_per_second'] / 1e12:.1f} | {mfu} | "
            f"{_gib(rec['peak_memory_bytes'])} | {rec['first_step_seconds']:.1f} | "
            f"{rec['graph_breaks']} | {rec['recompiles']} |"
        )
    return lines


def summarize(steps: list[StepResult]) -> tuple[str, bool]:
    """The summary text and whether every step passed.

    Args:
        steps: The steps, in the order they ran.

    Returns:
        ``(text, ok)``.
    """
    lines = ["## GPU smoke run", ""]
    measured = [rec for step in steps for rec in step.records if rec.get("status", "ok") == "ok"]
    if measured:
        first = measured[0]
        lines.append(
            f"device: {first['device_name']} ({first['device']}), torch {first['torch_version']}"
        )
        for source in dict.fromkeys(rec["peak_flops_source"] for rec in measured):
            lines.append(f"peak: {source}")
        lines.append("")
    lines += ["| step | status | seconds |", "|---|---|---|"]
    problems: dict[str, list[str]] = {}
    for step in steps:
        problems[step.name] = step_problems(step)
        status = "ok" if not problems[step.name] else "FAILED"
        lines.append(f"| {step.name} | {status} | {step.seconds:.0f} |")
    for step in steps:
        if not step.records:
            continue
        first = step.records[0]
        precision = next((r.get("precision") for r in step.records if r.get("precision")), "")
        lines += [
            "",
            f"### {step.name}: {first['model_preset']}, {first.get('dtype', '')}"
            + (f" ({precision})" if precision else ""),
        ]
        ok = [r for r in step.records if r.get("status", "ok") == "ok"]
        if ok:
            lines.append(
                f"batch {ok[0]['batch_size']} x seq {ok[0]['seq_len']}, world size "
                f"{ok[0]['world_size']}"
            )
        lines += _records_table(step.records)
        if ok:
            # Which AdamW each config ran (compiled under the compile presets) and its share.
            lines.append(
                "optimizer: "
                + "; ".join(
                    f"{rec['config']} {rec.get('optimizer', '?')} "
                    f"{rec.get('optimizer_fraction', 0.0):.1%} of the step"
                    for rec in ok
                )
            )
        for rec in step.records:
            if rec.get("status", "ok") != "ok":
                lines.append(f"{rec['status']}: {rec['config']}: {rec.get('reason', '')}")
            elif rec.get("float8_summary"):
                gemms = f", {rec['float8_gemms']}" if rec.get("float8_gemms") else ""
                lines.append(f"float8 ({rec['config']}{gemms}): {rec['float8_summary']}")
    failed = [name for name, found in problems.items() if found]
    if failed:
        lines += ["", "### failures"]
        for step in steps:
            for problem in problems[step.name]:
                lines.append(f"- {problem}")
            if problems[step.name]:
                lines += [f"    {line}" for line in _log_tail(step.log)]
    lines += ["", f"{len(steps) - len(failed)}/{len(steps)} steps passed"]
    return "\n".join(lines), not failed


def check_fp32_attention(seq_len: int = 4096, batch: int = 1, device: str = "cuda") -> str:
    """fp32 grouped-query attention, forward and backward, at ``seq_len`` tokens.

    Qwen3-1.7B's attention shape (hidden 2048, 16 query heads over 8 KV heads of 128).

    Args:
        seq_len: Tokens per sequence.
        batch: Sequences.
        device: Where to run (the smoke run: CUDA).

    Returns:
        One line: the SDPA kernels that ran (and the peak memory on CUDA).

    Raises:
        RuntimeError: If the math kernel ran (it materialises the scores).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from d9d.core.log_filters import quiet_profiler_markers
    from d9d.module.block.attention import GroupedQueryAttention

    target = torch.device(device)
    attention = GroupedQueryAttention(2048, 16, 8, 128, 1e-6).to(target)
    hidden = torch.randn(batch, seq_len, 2048, device=target, requires_grad=True)
    cos = torch.ones(batch, seq_len, 128, device=target)
    sin = torch.zeros(batch, seq_len, 128, device=target)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    quiet_profiler_markers()  # before kineto's first start: no USDT lines
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(hidden, (cos, sin)).sum().backward()
    ops = {event.key for event in prof.key_averages()}
    kernels = sorted(op for op in ops if op.startswith("aten::_scaled_dot_product_"))
    kernels = [op for op in kernels if not op.startswith("aten::_scaled_dot_product_attention")]
    if "aten::_scaled_dot_product_attention_math" in ops or not kernels:
        raise RuntimeError(
            f"fp32 GQA attention ran the math kernel (SDPA ops seen: {sorted(ops)[:20]})"
        )
    line = f"fp32 GQA attention, {batch} x {seq_len} tokens on {device}: {', '.join(kernels)}"
    if target.type == "cuda":
        line += f", peak {_gib(torch.cuda.max_memory_allocated(target))}"
    return line


CONTEXT_PARALLEL_REL_TOL = 1e-4
"""fp32 (no TF32) on both sides: only the order of the sums differs (FlexAttention's
blocks over a different key order); 1e-4 relative leaves room for the fused kernels."""


def _context_parallel_batch(seq_len: int, vocab: int, device) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq_len + 1), generator=gen)
    # Row 1 packs documents whose boundaries fall inside chunks and across the ranks.
    lengths = [seq_len // 3, seq_len // 2]
    row = [torch.arange(n) for n in (*lengths, seq_len - sum(lengths))]
    positions = torch.stack([torch.arange(seq_len), torch.cat(row)])
    labels = ids[:, 1:].clone()
    labels[1, -7:] = -100
    batch = {"input_ids": ids[:, :-1], "labels": labels, "position_ids": positions}
    return {k: v.to(device) for k, v in batch.items()}


def check_context_parallel(
    seq_len: int = 1024,
    device: str = "cuda",
    backend: str = "flex",
    presets: tuple[str, ...] = ("eager", "compile_sac"),
) -> list[str]:
    """Two context-parallel ranks against one process, forward and backward.

    Runs on every rank of a 2-rank ``torchrun`` (both ranks may share one device: the
    group is gloo, which stages accelerator tensors through host memory). Each rank also
    computes the one-process reference on the whole batch; the CP ranks' logps (at their
    tokens) and summed gradients must match it.

    Args:
        seq_len: Tokens per row (a multiple of 4).
        device: The device both ranks compute on.
        backend: The attention backend (``flex`` on the GPU; ``sdpa`` to check the
            check on the CPU, where FlexAttention has no backward).
        presets: Compile presets to run, each against its own one-process reference.

    Returns:
        One line per preset (rank 0 prints them).

    Raises:
        RuntimeError: If a result differs from the reference, or not 2 ranks.
    """
    import torch
    import torch.distributed as dist

    from d9d.compile import apply_compile_config, load_compile_config
    from d9d.module.model.qwen3_dense import (
        Qwen3DenseForCausalLMParameters,
        Qwen3DenseLayerParameters,
        Qwen3DenseParameters,
    )
    from d9d.module.model.qwen3_dense.model import whole_model
    from d9d.module.parallelism.context_parallel import (
        ContextParallelGroup,
        head_tail_indices,
        shard_batch_for_context_parallel,
    )
    from d9d.module.parallelism.model.qwen3_dense_context_parallel import (
        enable_context_parallel,
    )

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise RuntimeError(f"the context-parallel check runs on 2 ranks, got {world}")
    target = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    vocab = 512
    params = Qwen3DenseForCausalLMParameters(
        model=Qwen3DenseParameters(
            layer=Qwen3DenseLayerParameters(
                hidden_size=256,
                intermediate_size=512,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                head_dim=64,
            ),
            num_hidden_layers=2,
            rope_base=10000,
            max_position_ids=seq_len,
            split_vocab_size={"text": vocab},
            split_vocab_order=["text"],
        )
    )
    batch = _context_parallel_batch(seq_len, vocab, target)
    count = (batch["labels"] != -100).sum()
    tokens = head_tail_indices(seq_len, world, rank, target)
    local = shard_batch_for_context_parallel(batch, rank, world)
    lines = []
    for preset in presets:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            model = whole_model(params)
            model.to(target).reset_parameters()
            apply_compile_config(model, load_compile_config(preset))
            model.set_attention_backend(backend)
            models.append(model)
        reference, sharded = models
        enable_context_parallel(sharded, ContextParallelGroup(dist.group.WORLD, rank, world))
        ref_logps = reference(**batch)["logps"]
        (ref_logps.sum() / count).backward()
        logps = sharded(**local)["logps"]
        (logps.sum() / count).backward()
        worst_grad = 0.0
        for (name, param), ref_param in zip(
            sharded.named_parameters(), reference.parameters(), strict=True
        ):
            grad = param.grad.detach().cpu()
            dist.all_reduce(grad)  # every CP rank's share of the gradient
            ref_grad = ref_param.grad.detach().cpu()
            err = ((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item()
            worst_grad = max(worst_grad, err)
            if err > CONTEXT_PARALLEL_REL_TOL:
                raise RuntimeError(f"{preset}: gradient of {name} off by {err:.2e} (relative)")
        expected = ref_logps.detach()[:, tokens]
        logps_err = ((logps.detach() - expected).norm() / expected.norm()).reshape(1).cpu()
        dist.all_reduce(logps_err, op=dist.ReduceOp.MAX)  # every rank decides alike
        logps_err = logps_err.item()
        if logps_err > CONTEXT_PARALLEL_REL_TOL:
            raise RuntimeError(f"{preset}: logps off by {logps_err:.2e} (relative)")
        lines.append(
            f"context parallel x{world} ({backend}, {preset}) on {device}, 2 x {seq_len} "
            f"packed tokens: logps rel err {logps_err:.1e}, worst gradient rel err "
            f"{worst_grad:.1e} against one process"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Runs the command line (``summarize <out>``, ``fp32-attention``, ``context-parallel``)."""
    parser = argparse.ArgumentParser(prog="python -m d9d.profiling.smoke")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summarize", help="print the summary of a smoke run")
    summary.add_argument("out_dir", type=Path)
    attention = commands.add_parser("fp32-attention", help="fp32 GQA attention on CUDA")
    attention.add_argument("--seq-len", type=int, default=4096)
    attention.add_argument("--device", default="cuda")
    cp = commands.add_parser(
        "context-parallel", help="two CP ranks on one device vs one process (under torchrun)"
    )
    cp.add_argument("--seq-len", type=int, default=1024)
    cp.add_argument("--device", default="cuda")
    cp.add_argument("--backend", default="flex", choices=["flex", "sdpa"])
    cp.add_argument("--presets", nargs="+", default=["eager", "compile_sac"])
    args = parser.parse_args(argv)
    if args.command == "context-parallel":
        try:
            lines = check_context_parallel(
                args.seq_len, args.device, args.backend, tuple(args.presets)
            )
        except RuntimeError as err:
            print(f"smoke: error: {err}", file=sys.stderr)
            return 1
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print("\n".join(lines))
        dist.destroy_process_group()
        return 0
    if args.command == "summarize":
        try:
            text, ok = summarize(read_steps(args.out_dir))
        except ValueError as err:
            print(f"smoke: error: {err}", file=sys.stderr)
            return 2
        print(text)
        return 0 if ok else 1
    try:
        print(check_fp32_attention(args.seq_len, device=args.device))
    except RuntimeError as err:
        print(f"smoke: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
