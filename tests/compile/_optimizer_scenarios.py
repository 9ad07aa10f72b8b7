"""The compiled AdamW step on FSDP2 shards over two gloo ranks (spawned by the tests)."""

import torch
from torch._dynamo.utils import counters, get_compilation_metrics

from d9d.compile import CompileConfig
from d9d.compile.optimizer import CompiledAdamW
from d9d.core.dist_context import DeviceMeshParameters
from d9d.stack import build_stage_modules
from tests.helpers import DIST_MODEL_KW, make_batch, small_causal_lm_params

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _recompiles() -> int:
    return sum(1 for m in get_compilation_metrics() if (m.cache_size or 0) > 0)


def dp_shard_compiled_adamw(workdir: str, steps: int = 3) -> dict:
    """dp_shard=2: compiled vs eager AdamW on the same sharded model, ``steps`` steps."""
    del workdir
    ctx = DeviceMeshParameters(data_parallel_shard=2).build()
    params = small_causal_lm_params(**DIST_MODEL_KW)
    models = [build_stage_modules(params, CompileConfig(), ctx, seed=0).modules[0] for _ in "ab"]
    compiled = CompiledAdamW(models[0].parameters(), **HYPER)
    eager = torch.optim.AdamW(models[1].parameters(), foreach=False, **HYPER)
    input_ids, labels = make_batch(2, 16, seed=ctx.rank)  # each rank its own data
    recompiles_after_first = None
    for step in range(steps):
        for model, optimizer in zip(models, (compiled, eager), strict=True):
            model(input_ids=input_ids, labels=labels)["logps"].mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 0:
            recompiles_after_first = _recompiles()
    diff = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
    )
    return {
        "recompiles_after_first_step": _recompiles() - recompiles_after_first,
        "graph_breaks": sum(counters["graph_break"].values()),
        "max_param_diff": diff,
    }
