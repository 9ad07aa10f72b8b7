"""Clipping scenarios run inside spawned gloo ranks (see ``tests.helpers.run_spawned``).

Every rank rebuilds the single-device reference model (tiny), takes its gradients on the
whole global batch and clips a copy with ``torch.nn.utils.clip_grad_norm_``; the layout
under test runs the same step on its shards and stages and clips with
``d9d.train.grad_norm.clip_grad_norm_``.
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from d9d.core.dist_context import DeviceMeshParameters
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.parallelism.model.qwen3_dense import parallelize_qwen3_dense_for_causal_lm
from d9d.pipelining.api import PipelineStageInfo
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import build_schedule
from d9d.train.grad_norm import clip_grad_norm_
from tests.helpers import DIST_MODEL_KW, guarded, small_causal_lm_params

GLOBAL_BATCH, SEQ, VOCAB = 8, 8, 96
# Two key/value heads, so that tensor_parallel=2 splits them.
PARAMS = dict(DIST_MODEL_KW, num_key_value_heads=2)
INF = float("inf")
MAX_NORM = 0.05  # far below the norm, so clipping really scales every gradient

LAYOUTS = {
    "dp_shard=4": dict(data_parallel_shard=4),
    "pp=2 x dp_shard=2": dict(pipeline_parallel=2, data_parallel_shard=2),
    "dp_replicate=2 x dp_shard=2": dict(data_parallel_replicate=2, data_parallel_shard=2),
    "pp=4": dict(pipeline_parallel=4),
    # FSDP2 shards the TP-split q/k/v/gate/up weights with strided shards on the dp dim.
    "dp_shard=2 x tp=2": dict(data_parallel_shard=2, tensor_parallel=2),
}


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[1, :3] = -100
    return {"input_ids": ids[:, :-1].contiguous(), "labels": labels}


def _reference(norm_type):
    torch.manual_seed(0)
    model = Qwen3DenseForCausalLM(
        small_causal_lm_params(**PARAMS),
        PipelineStageInfo(0, 1),
        hidden_states_snapshot_mode="no",
        enable_checkpointing=False,
    )
    model.reset_parameters()
    batch = _batch()
    logps = model(**batch)["logps"]
    (logps.sum() / (batch["labels"] != -100).sum()).backward()
    clipped = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clipped.parameters(), strict=True):
        q.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(clipped.parameters(), MAX_NORM, norm_type=norm_type)
    grads = {n: p.grad for n, p in clipped.named_parameters()}
    return model.state_dict(), norm.item(), grads


def _layout(mesh: dict, norm_type: float) -> dict:
    state, ref_norm, ref_grads = _reference(norm_type)
    ctx = DeviceMeshParameters(**mesh).build()
    (stage_index,) = ctx.local_pipeline_stages(1)
    info = PipelineStageInfo(stage_index, ctx.pp_size)
    with torch.device("meta"):
        model = Qwen3DenseForCausalLM(
            small_causal_lm_params(**PARAMS),
            info,
            hidden_states_snapshot_mode="no",
            enable_checkpointing=False,
        )
    parallelize_qwen3_dense_for_causal_lm(ctx, model, info)
    model.to_empty(device=ctx.device)
    model.reset_parameters()
    set_model_state_dict(
        model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False)
    )
    batch = _batch()
    rows = GLOBAL_BATCH // ctx.dp_size
    local = {k: v[ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows] for k, v in batch.items()}
    build_schedule(ctx, [model], [info], local, ctx.pp_size, CausalLMLoss()).step(local)
    norm = clip_grad_norm_(model.parameters(), MAX_NORM, pp_group=ctx.pp_group, norm_type=norm_type)
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        worst = max(worst, (grad - ref_grads[name]).abs().max().item())
    return {
        "norm": norm.item(),
        "ref_norm": ref_norm,
        "clipped_grad_diff": worst,
        "is_dtensor": isinstance(next(model.parameters()), DTensor),
    }


def _partial_and_strided() -> dict:
    """Hand-made DTensor gradients: a partial one, a strided shard over a 2-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    rank = dist.get_rank()
    full = torch.arange(16.0).reshape(8, 2) - 5.0  # the gradient a single device holds
    flat = init_device_mesh("cpu", (4,))
    # Each rank holds a quarter of the sum (rank-dependent pieces that add up to it).
    piece = full * (rank + 1) / 10.0
    partial = torch.nn.Parameter(DTensor.from_local(piece, flat, [Partial()]).full_tensor())
    partial.grad = DTensor.from_local(piece, flat, [Partial()])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    strided = torch.distributed.tensor.distribute_tensor(
        full, mesh, [_StridedShard(0, split_factor=2), Shard(0)]
    )
    param = torch.nn.Parameter(strided.detach().clone())
    param.grad = strided
    return {
        "partial": clip_grad_norm_([partial], None).item(),
        "strided": clip_grad_norm_([param], None).item(),
        "expected": full.norm().item(),
    }


def four_rank_job(workdir: str) -> dict:
    torch.use_deterministic_algorithms(False)
    results = {}
    for name, mesh in LAYOUTS.items():
        results[f"{name} L2"] = guarded(_layout, mesh, 2.0)
    # The max-norm reduces with MAX instead of sums: one layout with both kinds of ranks.
    results["pp=2 x dp_shard=2 Linf"] = guarded(_layout, LAYOUTS["pp=2 x dp_shard=2"], INF)
    results["partial and strided"] = guarded(_partial_and_strided)
    return results
