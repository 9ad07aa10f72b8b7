"""Packed documents vs one document per padded row: useful tokens/s, and the mask's cost.

Used by ``profiling/mfu.py --packed``. One corpus of documents is drawn from a stated
length distribution (log-normal, mean ``seq_len / 8``, sigma 1, clipped to
``[2, seq_len + 1]`` so that a document always fits one padded row). The same documents
are trained two ways, with the same model, preset, batch shape and AdamW:

* ``padded``: one document per row, right-padded to ``seq_len`` (``position_ids=None``:
  plain causal attention, as before packing existed);
* ``packed``: rows from :func:`d9d.dataset.plan_packed_rows` (document-masked attention).

Useful tokens are the trained predictions (labels that are not -100); both layouts
make exactly the same predictions per document, so useful tokens/s compare directly.
FLOPs per useful token count attention per document
(:func:`d9d.metrics.flops.packed_training_flops_per_token`), so padding and masked-out
cross-document attention never inflate MFU.

The mask's cost is measured on attention alone (forward + backward of
``scaled_dot_product_attention`` at the model's head shape): plain causal vs the boolean
document mask on a packed row, plus the time to build the mask once per forward.
"""

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d9d.compile import CompileConfig
from d9d.dataset import materialize_rows, plan_packed_rows
from d9d.metrics.device import device_name
from d9d.metrics.flops import packed_training_flops_per_token
from d9d.metrics.peak import PeakFlops
from d9d.module.block.document_mask import build_document_mask, document_ids_from_position_ids
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLMParameters
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import SingleStageSchedule
from d9d.profiling.benchmark import make_adamw, release_memory
from d9d.stack import build_stage_modules

LENGTH_SIGMA = 1.0
"""Sigma of the log-normal document lengths (their mean is ``seq_len / 8``)."""


def sample_document_lengths(num_docs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths with mean ``seq_len / 8``, clipped to ``[2, seq_len + 1]``."""
    rng = np.random.default_rng(seed)
    mu = np.log(seq_len / 8) - LENGTH_SIGMA**2 / 2
    lengths = rng.lognormal(mu, LENGTH_SIGMA, num_docs).round().astype(np.int64)
    return np.clip(lengths, 2, seq_len + 1)


def _padded_rows(documents: list[np.ndarray], seq_len: int) -> dict[str, torch.Tensor]:
    input_ids = torch.zeros(len(documents), seq_len, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    for row, doc in enumerate(documents):
        doc = torch.from_numpy(doc)
        input_ids[row, : len(doc) - 1] = doc[:-1]
        labels[row, : len(doc) - 1] = doc[1:]
    return {"input_ids": input_ids, "labels": labels}


def _segment_lengths(position_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Lengths of the documents holding at least one trained token (padding excluded)."""
    lengths = []
    for ids, row_labels in zip(document_ids_from_position_ids(position_ids), labels, strict=True):
        trained = torch.bincount(ids[row_labels != -100])
        counts = torch.bincount(ids)
        lengths += counts[: len(trained)][trained > 0].tolist()
    return lengths


@dataclass(frozen=True)
class PackedRecord:
    """One layout (packed or padded) of one compile preset, measured."""

    config: str
    layout: str
    batch_size: int
    seq_len: int
    steps: int
    step_seconds_median: float
    useful_tokens_per_second: float
    slot_efficiency: float
    flops_per_useful_token: int
    achieved_tflops: float
    mfu: float


def _train_steps(schedule, optimizer, batches, device, warmup: int) -> tuple[list[float], int]:
    times, useful = [], 0
    for index, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = schedule.step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
            useful += int(result.num_items)
    return times, useful


def run_packed_benchmark(
    params: Qwen3DenseForCausalLMParameters,
    configs: Sequence[CompileConfig],
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    dtype: torch.dtype,
    device: torch.device,
    peak: PeakFlops,
    seed: int = 0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[list[PackedRecord], dict]:
    """Trains the padded and the packed layout of one corpus under every preset.

    Returns:
        The records, and a dict describing the corpus and the mask's cost.
    """
    num_rows = (warmup + steps) * batch_size
    # Enough documents for the packed rows; the padded layout uses the first num_rows.
    mean = seq_len / 8
    lengths = sample_document_lengths(int(num_rows * (seq_len + 1) / mean * 1.3) + 1, seq_len, seed)
    rng = np.random.default_rng(seed + 1)
    vocab = params.model.vocab_size
    documents = [rng.integers(0, vocab, n) for n in lengths.tolist()]
    plan = plan_packed_rows(lengths.tolist(), seq_len, seed=seed)
    if len(plan) < num_rows:
        raise ValueError(f"corpus packs into {len(plan)} rows, {num_rows} needed")

    def tokens(doc: int, start: int, length: int) -> np.ndarray:
        return documents[doc][start : start + length]

    packed = materialize_rows(plan, range(num_rows), tokens)
    padded = _padded_rows(documents[:num_rows], seq_len)
    layouts = {
        "padded": (
            [
                {k: v[i : i + batch_size] for k, v in padded.items()}
                for i in range(0, num_rows, batch_size)
            ],
            float(lengths[:num_rows].sum() / (num_rows * (seq_len + 1))),
        ),
        "packed": (
            [
                {k: v[i : i + batch_size] for k, v in packed.items()}
                for i in range(0, num_rows, batch_size)
            ],
            plan.efficiency,
        ),
    }
    doc_lengths = {
        # A padded row's document is its n - 1 real input tokens (padding is no work).
        "padded": (lengths[:num_rows] - 1).tolist(),
        "packed": _segment_lengths(packed["position_ids"], packed["labels"]),
    }
    records = []
    for config in configs:
        for layout, (batches, efficiency) in layouts.items():
            stack = build_stage_modules(params, config, param_dtype=dtype, device=device, seed=seed)
            (model,) = stack.modules
            optimizer, _ = make_adamw(model.parameters())
            schedule = SingleStageSchedule(model, CausalLMLoss())
            log(f"[{config.name}/{layout}] {warmup} warm-up + {steps} measured steps")
            times, useful = _train_steps(schedule, optimizer, batches, device, warmup)
            flops = packed_training_flops_per_token(params, doc_lengths[layout])
            tokens_per_second = useful / sum(times)
            achieved = tokens_per_second * flops.total
            records.append(
                PackedRecord(
                    config=config.name,
                    layout=layout,
                    batch_size=batch_size,
                    seq_len=seq_len,
                    steps=steps,
                    step_seconds_median=float(np.median(times)),
                    useful_tokens_per_second=tokens_per_second,
                    slot_efficiency=efficiency,
                    flops_per_useful_token=flops.total,
                    achieved_tflops=achieved / 1e12,
                    mfu=achieved / peak.flops_per_second,
                )
            )
            del stack, model, optimizer, schedule
            release_memory(device)
    corpus = {
        "num_documents": len(lengths),
        "length_distribution": f"log-normal, mean seq_len/8 = {mean:g}, sigma {LENGTH_SIGMA}, "
        f"clipped to [2, {seq_len + 1}]",
        "mean_length": float(lengths.mean()),
        "packed_rows": len(plan),
        "packed_efficiency": plan.efficiency,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "peak": f"{peak.flops_per_second / 1e12:.3g} TFLOP/s ({peak.source})",
        "flops_convention": "6N + 12*L*H*head_dim*sum(n_i^2)/sum(n_i) per useful token: "
        "attention per document, full n x n (not the causal half)",
        "mask_cost": measure_mask_cost(params, packed["position_ids"][:batch_size], dtype, device),
    }
    return records, corpus


def _time(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_mask_cost(
    params: Qwen3DenseForCausalLMParameters,
    position_ids: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    reps: int = 5,
) -> dict[str, float]:
    """Attention forward+backward (ms): plain causal vs the SDPA document mask.

    Args:
        params: Model parameters (head counts and size).
        position_ids: A packed batch's ``(batch, seq)`` positions.
        dtype: Compute dtype.
        device: Device.
        reps: Timed repetitions (median).
    """
    layer = params.model.layer
    batch, seq = position_ids.shape
    position_ids = position_ids.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(heads):
        return torch.randn(
            batch, heads, seq, layer.head_dim, dtype=dtype, device=device, generator=gen
        ).requires_grad_()

    q, k, v = (
        rand(layer.num_attention_heads),
        rand(layer.num_key_value_heads),
        rand(layer.num_key_value_heads),
    )
    gqa = layer.num_attention_heads != layer.num_key_value_heads
    with torch.no_grad():
        mask = build_document_mask(position_ids, "sdpa")

    def causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).sum().backward()

    def build():
        with torch.no_grad():
            build_document_mask(position_ids, "sdpa")

    return {
        "causal_ms": 1e3 * _time(causal, device, reps),
        "document_mask_ms": 1e3 * _time(masked, device, reps),
        "mask_build_ms": 1e3 * _time(build, device, reps),
    }


def format_packed_table(records: list[PackedRecord], corpus: dict) -> str:
    """A Markdown table of the records plus the corpus and mask-cost lines."""
    lines = [
        "| config | layout | slot efficiency | step s | useful tok/s | speed-up | "
        "FLOPs/useful tok | TFLOP/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    baseline = {r.config: r.useful_tokens_per_second for r in records if r.layout == "padded"}
    for r in records:
        speedup = r.useful_tokens_per_second / baseline[r.config]
        lines.append(
            f"| {r.config} | {r.layout} | {r.slot_efficiency:.3f} | {r.step_seconds_median:.3f} "
            f"| {r.useful_tokens_per_second:,.0f} | {speedup:.2f}x | "
            f"{r.flops_per_useful_token / 1e6:.1f}M | {r.achieved_tflops:.3f} | {r.mfu:.1%} |"
        )
    cost = corpus["mask_cost"]
    lines += [
        "",
        f"documents: {corpus['num_documents']} ({corpus['length_distribution']}; "
        f"mean {corpus['mean_length']:.1f}), packed into {corpus['packed_rows']} rows "
        f"(efficiency {corpus['packed_efficiency']:.3f})",
        f"device: {corpus['device']}, {corpus['threads']} threads, peak {corpus['peak']}",
        f"FLOPs: {corpus['flops_convention']}",
        f"attention fwd+bwd on one packed batch: causal {cost['causal_ms']:.2f} ms, "
        f"document mask {cost['document_mask_ms']:.2f} ms "
        f"({cost['document_mask_ms'] / cost['causal_ms']:.2f}x); mask build "
        f"{cost['mask_build_ms']:.2f} ms per forward; unpacked rows take the causal path "
        "(no mask, no cost)",
    ]
    return "\n".join(lines)


def write_packed_json(path, records: list[PackedRecord], corpus: dict) -> None:
    """Writes the records and the corpus description as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"records": [asdict(r) for r in records], "corpus": corpus}, indent=2) + "\n"
    )
