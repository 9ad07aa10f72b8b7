r"""One AdamW step over a model's parameter shapes: eager fused, eager foreach, compiled.

The harness's "optim share" is this step inside a training step; here it runs alone, the
three implementations interleaved for ``--rounds`` rounds (best and median of each), on
parameters of the model preset's shapes with random gradients, and the bytes an AdamW
step must move (parameter, gradient, two moments read; three written) give the memory
bandwidth each reaches::

    python profiling/optimizer_step.py                    # cpu-small, bf16
    python profiling/optimizer_step.py --dtype float32
"""

import argparse
import statistics
import sys
import time

import torch

from d9d.compile.optimizer import CompiledAdamW
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.model.qwen3_dense.presets import preset_parameters
from d9d.pipelining.api import PipelineStageInfo

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_BYTES_MOVED_PER_ELEMENT = 7  # reads: param, grad, exp_avg, exp_avg_sq; writes: 3 of them


def main(argv: list[str] | None = None) -> int:
    """Prints one line per implementation."""
    parser = argparse.ArgumentParser(prog="profiling/optimizer_step.py", description=__doc__)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    with torch.device("meta"):
        model = Qwen3DenseForCausalLM(
            preset_parameters(args.model),
            PipelineStageInfo(0, 1),
            hidden_states_snapshot_mode="no",
            enable_checkpointing=False,
        )
    shapes = [param.shape for param in model.parameters()]
    builders = {
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW(compiled)": lambda ps: CompiledAdamW(ps, lr=1e-4),
    }
    optimizers = {}
    for name, build in builders.items():
        params = [torch.nn.Parameter(torch.randn(shape).to(dtype) * 0.02) for shape in shapes]
        for param in params:
            param.grad = torch.randn_like(param) * 0.01
        optimizer = build(params)
        start = time.perf_counter()
        optimizer.step()  # the compiled one compiles here
        print(f"{name}: first step {time.perf_counter() - start:.2f} s", file=sys.stderr)
        optimizers[name] = optimizer
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            seconds[name].append(time.perf_counter() - start)
    numel = sum(shape.numel() for shape in shapes)
    moved = numel * torch.empty((), dtype=dtype).element_size() * _BYTES_MOVED_PER_ELEMENT
    for name, times in seconds.items():
        best = min(times)
        print(
            f"{name}: best {best * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms, "
            f"{moved / best / 1e9:.0f} GB/s ({numel / 1e6:.1f}M {args.dtype} parameters, "
            f"{moved / 1e6:.0f} MB moved, {torch.get_num_threads()} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
