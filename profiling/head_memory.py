"""Peak memory and time of one training step, by LM-head loss implementation.

Compares, on the same model and batch (default: realistic vocabulary 151936, one
2048-token sequence, bf16, a 2-layer hidden-512 backbone so the head dominates):

* ``naive fp32 logits``: the textbook path (``logits.float()``, ``logsumexp - gather``),
  which is what the model did before the memory-bounded head and what HF does;
* ``kept bf16 logits``: this project's default when the logits fit the budget, with the
  fused compiled loss kernels (``compile`` preset);
* ``chunked``: the same with a small budget, so logits are recomputed chunk by chunk.

Peak = the highest net allocation during one step (forward, backward): on the CPU from
``torch.profiler`` memory events, on CUDA ``max_memory_allocated`` minus what was
allocated before the step; the resident weights and gradients are not included. Steps
are timed with the harness's clock (device synchronised before each reading).

    python profiling/head_memory.py
    python profiling/head_memory.py --device cuda --seq-len 8192
"""

import argparse
import statistics
import sys

import torch
from tabulate import tabulate

from d9d.compile import apply_compile_config, load_compile_config
from d9d.metrics.memory import profiled_step_peak_bytes
from d9d.metrics.timers import DeviceClock
from d9d.module.block.head import IGNORE_INDEX
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseForCausalLMParameters
from d9d.module.model.qwen3_dense.presets import get_model_preset
from d9d.pipelining.api import PipelineStageInfo


def _step_peak_bytes(step, device: torch.device) -> int:
    if device.type != "cuda":
        return profiled_step_peak_bytes(step, device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _naive_nll(model: Qwen3DenseForCausalLM, ids: torch.Tensor, labels: torch.Tensor):
    hidden = model.model(input_ids=ids)["hidden_states"]
    logits = model.lm_head.logits(hidden).float()
    ignored = labels == IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, dim=-1) - picked).masked_fill(ignored, 0.0)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line: measures each LM-head loss variant; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=151_936)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--chunk-mib", type=int, default=128, help="budget of the chunked row")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    clock = DeviceClock(device)

    base = get_model_preset("cpu-small").parameters(num_hidden_layers=args.num_layers)
    # Rebuilt through the pydantic model so the new sizes are validated.
    params = Qwen3DenseForCausalLMParameters.model_validate(
        {
            "model": {
                **base.model.model_dump(),
                "split_vocab_size": {"text": args.vocab_size},
                "split_vocab_order": ["text"],
                "max_position_ids": max(base.model.max_position_ids, args.seq_len),
            }
        }
    )
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    labels = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)

    variants = {
        "naive fp32 logits (before)": None,
        "kept bf16 logits (default)": 2**30,
        f"chunked ({args.chunk_mib} MiB budget)": args.chunk_mib * 2**20,
    }
    rows = []
    for name, budget in variants.items():
        torch.manual_seed(0)
        model = Qwen3DenseForCausalLM(
            params,
            PipelineStageInfo(0, 1),
            hidden_states_snapshot_mode="no",
            enable_checkpointing=False,
        )
        model = model.to(device=device, dtype=torch.bfloat16)
        apply_compile_config(model, load_compile_config("compile"))
        if budget is not None:
            model.lm_head.logits_chunk_bytes = budget

        def step(model=model, naive=budget is None):
            nll = (
                _naive_nll(model, ids, labels)
                if naive
                else model(input_ids=ids, labels=labels)["logps"]
            )
            nll.mean().backward()
            model.zero_grad(set_to_none=True)

        step()  # compile
        times = []
        for _ in range(args.steps):
            start = clock.now()
            step()
            times.append(clock.now() - start)
        peak = _step_peak_bytes(step, device)
        rows.append([name, f"{peak / 2**20:,.0f}", f"{statistics.median(times):.3f}"])
        print(f"{name}: done", file=sys.stderr)
    tokens = args.batch_size * args.seq_len
    print(
        f"V={args.vocab_size}, {args.batch_size} x {args.seq_len} tokens, bf16, {device}, "
        f"{args.num_layers} layers hidden 512 (compile preset); full fp32 logits would be "
        f"{tokens * args.vocab_size * 4 / 2**20:,.0f} MiB"
    )
    print(tabulate(rows, headers=["LM-head loss", "step peak MiB", "fwd+bwd s (median)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
