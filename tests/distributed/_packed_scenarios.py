"""Packed-document batches under pipelining and FSDP2 (run in spawned gloo ranks).

Every scenario trains one step on the same packed global batch as a single-process
reference with the same weights, and reports its worst differences. Documents are
packed by ``d9d.dataset.pack_documents``: rows hold several documents, one-token
documents, and continuation chunks whose positions do not restart.
"""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from d9d.core.dist_context import DeviceMeshParameters
from d9d.dataset import pack_documents
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.pipelining.api import PipelineStageInfo
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import build_schedule
from d9d.stack import build_stage_modules
from tests.helpers import (
    DIST_MODEL_KW,
    guarded,
    reference_model,
    reference_step,
    small_causal_lm_params,
)

GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 96
MODEL_KW = dict(DIST_MODEL_KW, max_position_ids=64)

PACKED_LAYOUTS = {
    "pp=2 1f1b": dict(mesh=dict(pipeline_parallel=2), schedule="1f1b"),
    "dp_shard=2": dict(mesh=dict(data_parallel_shard=2)),
    "pp=2 1f1b compile_sac": dict(
        mesh=dict(pipeline_parallel=2), schedule="1f1b", compile_config="compile_sac"
    ),
}


def packed_global_batch() -> dict[str, torch.Tensor]:
    """``GLOBAL_BATCH`` packed rows of ``SEQ`` tokens: all the rows of a small corpus."""
    # A document split over three rows, one-token documents, rows of 1 to 4 documents
    # and a row with padding.
    lengths = [40, 1, 1, 9, 12, 5, 7, 3, 10, 6, 4, 11, 2, 8, 6]
    gen = torch.Generator().manual_seed(4321)
    documents = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    batch, plan = pack_documents(documents, SEQ, seed=1)
    assert len(plan) == GLOBAL_BATCH, len(plan)
    return batch


def _reference():
    model = reference_model(Qwen3DenseForCausalLM, small_causal_lm_params(**MODEL_KW))
    batch = packed_global_batch()
    out, loss, grads = reference_step(model, batch)
    return model, batch, out["logps"].detach(), loss, grads


def _build_stages(ctx, ref_state, compile_config):
    """This rank's stages through the one builder, then the reference weights loaded."""
    if compile_config is not None:
        from d9d.compile import load_compile_config

        compile_config = load_compile_config(compile_config)
    stack = build_stage_modules(
        small_causal_lm_params(**MODEL_KW), compile_config, ctx, init="reset", seed=1
    )
    for model in stack.modules:
        # set_model_state_dict replaces the values of the dict it is given by sharded
        # copies: hand it a shallow copy so the reference stays plain.
        set_model_state_dict(
            model, dict(ref_state), options=StateDictOptions(full_state_dict=True, strict=False)
        )
    return stack.modules


def run_packed_layout(mesh: dict, schedule: str | None = None, compile_config=None) -> dict:
    """One training step of the packed batch under ``mesh``; worst differences."""
    import torch._dynamo.utils as dynamo_utils

    breaks_before = sum(dynamo_utils.counters["graph_break"].values())
    ref, batch, ref_logps, ref_loss, ref_grads = _reference()
    ctx = DeviceMeshParameters(**mesh).build()
    local_batch = GLOBAL_BATCH // ctx.dp_size
    rows = slice(ctx.dp_rank * local_batch, (ctx.dp_rank + 1) * local_batch)
    local = {k: v[rows] for k, v in batch.items()}
    infos = [PipelineStageInfo(s, ctx.pp_size) for s in ctx.local_pipeline_stages(1)]
    models = _build_stages(ctx, ref.state_dict(), compile_config)
    loss_fn = CausalLMLoss()
    n_microbatches = 4 if schedule is not None else 1
    pipe = build_schedule(
        ctx, models, infos, local, n_microbatches, loss_fn, kind=schedule or "1f1b"
    )
    step = pipe.step(local, return_outputs=True)
    loss, has_last = step.loss, pipe.has_last_stage
    logps = step.outputs["logps"] if has_last else None
    result: dict = {"graph_breaks": sum(dynamo_utils.counters["graph_break"].values())}
    result["graph_breaks"] -= breaks_before
    if has_last:
        result["loss_diff"] = (loss - ref_loss).abs().item()
        result["logps_diff"] = (logps - ref_logps[rows]).abs().max().item()
    worst, names = 0.0, []
    for model in models:
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            worst = max(worst, (grad - ref_grads[name]).abs().max().item())
            names.append(name)
    result["grad_diff"], result["checked_params"] = worst, names
    result["all_params"] = sorted(ref_grads)
    return result


def two_rank_job(workdir: str, names: list[str]) -> dict:
    """Every packed layout in ``names``."""
    return {name: guarded(run_packed_layout, **PACKED_LAYOUTS[name]) for name in names}
