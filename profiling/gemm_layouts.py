r"""How fast each GEMM form of a linear layer's training step runs here, by memory layout.

A linear ``y = x @ W.T`` (``x``: tokens x in, ``W``: out x in) runs three GEMMs per step:
the forward ``x @ W.T``, the input gradient ``grad @ W`` and the weight gradient
``grad.T @ x`` (a reduction over the tokens, with a transposed left operand). This times
each at the model's sizes, plus two other layouts of the weight gradient: a contiguous
copy of ``grad.T`` first (copy included), and ``(x.T @ grad).T``. Best of ``--repeats``
rounds, the forms interleaved in each (the question is what the kernel can reach; load
from other processes only slows it)::

    python profiling/gemm_layouts.py                        # cpu-small linears, 512 tokens
    python profiling/gemm_layouts.py --dtype float32 --tokens 1024
"""

import argparse
import sys
import time

import torch

from d9d.module.model.qwen3_dense.presets import get_model_preset

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def gemm_forms(tokens: int, in_features: int, out_features: int, dtype, repeats: int) -> dict:
    """TFLOP/s of each form for one linear of ``in_features -> out_features``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    grad = torch.randn(tokens, out_features, generator=gen).to(dtype)
    forms = {
        "x @ W.T": lambda: x @ weight.t(),
        "grad @ W": lambda: grad @ weight,
        "grad.T @ x": lambda: grad.t() @ x,
        "grad.T.contiguous() @ x": lambda: grad.t().contiguous() @ x,
        "(x.T @ grad).T": lambda: (x.t() @ grad).t(),
    }
    flops = 2.0 * tokens * in_features * out_features
    best = dict.fromkeys(forms, float("inf"))
    for fn in forms.values():
        fn()  # warm-up (oneDNN primitive creation, caches)
    # Round robin: a burst of load from other processes hits every form alike, and the
    # best of each form is taken over the rounds.
    for _ in range(repeats):
        for name, fn in forms.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: flops / seconds / 1e12 for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    """Prints one Markdown row per distinct linear of the model."""
    parser = argparse.ArgumentParser(prog="profiling/gemm_layouts.py", description=__doc__)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--tokens", type=int, default=512, help="batch x sequence")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    preset = get_model_preset(args.model)
    hidden, inter = preset.hidden_size, preset.intermediate_size
    q = preset.num_attention_heads * preset.head_dim
    kv = preset.num_key_value_heads * preset.head_dim
    linears = {
        "q_proj / o_proj": (hidden, q),
        "k_proj, v_proj": (hidden, kv),
        "gate_proj, up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
        "lm_head": (hidden, preset.vocab_size),
    }
    dtype = _DTYPES[args.dtype]
    header = None
    for name, (fan_in, fan_out) in linears.items():
        rates = gemm_forms(args.tokens, fan_in, fan_out, dtype, args.repeats)
        if header is None:
            header = list(rates)
            print("| linear (in -> out) | " + " | ".join(header) + " |")
            print("|---" * (len(header) + 1) + "|")
        cells = " | ".join(f"{rates[form]:.3f}" for form in header)
        print(f"| {name} ({fan_in} -> {fan_out}) | {cells} |")
    print(
        f"\nTFLOP/s, best of {args.repeats}; {args.tokens} tokens, {args.dtype}, "
        f"{torch.get_num_threads()} threads, model {args.model}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
