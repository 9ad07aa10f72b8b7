"""Tensor-parallel scenarios run inside spawned gloo ranks (``tests.helpers.run_spawned``).

Each layout is compared with a single-process reference holding the same weights and
fed the same global batch (two of its rows pack several documents), rebuilt on every
rank: the model is tiny. Results are relative errors of the loss, the per-token outputs
and every gathered gradient, plus the checks that gradients are complete when
``backward()`` returns (every gradient has its parameter's placements, nothing left
partial).
"""

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from d9d.core.dist_context import DeviceMeshParameters
from d9d.dataset import token_pooling_mask_from_attention_mask
from d9d.module.parallelism.model.qwen3_dense import (
    parallelize_qwen3_dense_for_causal_lm,
    parallelize_qwen3_dense_for_classification,
)
from d9d.pipelining.api import PipelineStageInfo
from d9d.pipelining.loss import CausalLMLoss, ClassificationLoss
from d9d.pipelining.step import build_schedule
from d9d.stack import build_stage_modules
from tests import helpers
from tests.helpers import guarded, kind_model_cls, kind_params, rel_err

GLOBAL_BATCH = 4
SEQ = 8
# Three vocabulary splits in non-alphabetical order, each divisible by 2 and by 4.
SPLITS = {"text": 40, "code": 24, "special": 8}
SPLIT_ORDER = ["text", "special", "code"]
VOCAB = sum(SPLITS.values())
MODEL_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_ids=32,
    split_vocab_size=SPLITS,
    split_vocab_order=SPLIT_ORDER,
)


# Rows 1 and 2 pack several documents (a document starts where the position does not
# follow the previous one): every scenario runs the document-masked attention too.
PACKED_POSITIONS = torch.tensor(
    [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 0, 1, 0, 1],
        [3, 4, 5, 6, 7, 8, 9, 10],
    ]
)


def _params(kind: str, num_layers: int = 2, **overrides):
    return kind_params(kind, **dict(MODEL_KW, num_hidden_layers=num_layers, **overrides))


_model_cls = kind_model_cls


def _batch(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    ids[0, 1], ids[1, 2] = VOCAB - 1, SPLITS["text"]  # both ends of the later splits
    lengths = torch.tensor([8, 3, 7, 5])
    attention = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": ids[:, :-1].contiguous(),
        "position_ids": PACKED_POSITIONS,
        "hidden_states_agg_mask": attention,
    }
    if kind == "causal_lm":
        labels = ids[:, 1:].clone()
        labels[attention == 0] = -100
        batch["labels"] = labels
    else:
        batch["pooling_mask"] = token_pooling_mask_from_attention_mask(attention, "last")
        batch["labels"] = torch.tensor([2, 0, -100, 1])
    return batch


def reference_model(
    kind: str = "causal_lm", num_layers: int = 2, snapshot: str = "no"
) -> torch.nn.Module:
    """The single-process model every scenario compares with (same weights everywhere)."""
    return helpers.reference_model(_model_cls(kind), _params(kind, num_layers), snapshot)


def _reference(kind: str, num_layers: int, snapshot: str = "no"):
    model = reference_model(kind, num_layers, snapshot)
    batch = _batch(kind)
    out, loss, grads = helpers.reference_step(model, batch)
    return model, batch, out, loss, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _build_user_order(ctx, kind, num_layers, compile_config, snapshot):
    """What a user without the builder writes: compile preset, parallelize, materialise."""
    from d9d.compile import apply_compile_config

    info = PipelineStageInfo(0, 1)
    with torch.device("meta"):
        model = _model_cls(kind)(_params(kind, num_layers), info, snapshot, False)
    report = apply_compile_config(model, compile_config)
    parallelize = (
        parallelize_qwen3_dense_for_causal_lm
        if kind == "causal_lm"
        else parallelize_qwen3_dense_for_classification
    )
    parallelize(ctx, model, info)
    model.to_empty(device="cpu")
    model.reset_parameters()
    return SimpleNamespace(modules=[model], infos=[info], reports=[report])


def _build(ctx, kind, num_layers, ref_state, compile_config, user_order, snapshot):
    if user_order:
        stack = _build_user_order(ctx, kind, num_layers, compile_config, snapshot)
    else:
        stack = build_stage_modules(
            _params(kind, num_layers),
            compile_config,
            ctx,
            hidden_states_snapshot_mode=snapshot,
            init="reset",
            seed=77 + dist.get_rank(),  # a different init: the load must overwrite it
        )
    for model in stack.modules:
        set_model_state_dict(
            model, dict(ref_state), options=StateDictOptions(full_state_dict=True, strict=False)
        )
    return stack


def _grad_report(models, ref_grads) -> dict:
    worst, names, incomplete, placements = 0.0, [], [], {}
    for model in models:
        for name, param in model.named_parameters():
            grad = param.grad
            names.append(name)
            if isinstance(param, DTensor):
                placements[name] = [str(p) for p in param.placements]
                if grad.placements != param.placements:
                    incomplete.append(f"{name}: grad {grad.placements} vs {param.placements}")
            worst = max(worst, rel_err(_full(grad), ref_grads[name]))
    return {
        "grad_rel": worst,
        "checked_params": names,
        "incomplete_grads": incomplete,
        "placements": placements,
    }


def run_tp_layout(
    mesh: dict,
    kind: str = "causal_lm",
    schedule: str | None = None,
    num_layers: int = 2,
    compile_config: str | None = None,
    chunk_tokens: int | None = None,
    user_order: bool = False,
    snapshot: str = "no",
) -> dict:
    """One training step under ``mesh``; relative errors to the single-process reference.

    ``chunk_tokens`` bounds the LM head's logits to that many tokens (several chunks,
    recomputed in backward) instead of keeping them all. ``user_order`` builds without
    the builder: ``apply_compile_config``, then ``parallelize_*`` (which applies the TP
    plan after checkpointing and compile), then ``to_empty`` and ``reset_parameters()``.
    """
    import torch._dynamo.utils as dynamo_utils

    from d9d.compile import load_compile_config

    config = load_compile_config(compile_config) if compile_config else None
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    breaks_before = sum(dynamo_utils.counters["graph_break"].values())
    ref, batch, ref_out, ref_loss, ref_grads = _reference(kind, num_layers, snapshot)
    ctx = DeviceMeshParameters(**mesh).build()
    per_rank = GLOBAL_BATCH // ctx.dp_size
    rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    local = {k: v[rows] for k, v in batch.items()}
    stack = _build(ctx, kind, num_layers, ref.state_dict(), config, user_order, snapshot)
    if chunk_tokens is not None:
        head = stack.modules[-1].lm_head
        local_vocab = VOCAB // ctx.params.tensor_parallel
        head.logits_chunk_bytes = chunk_tokens * local_vocab * 4
    head = "logps" if kind == "causal_lm" else "scores"
    result: dict = {}
    loss_fn = CausalLMLoss() if kind == "causal_lm" else ClassificationLoss()
    n_microbatches = 2 if schedule is not None else 1
    pipe = build_schedule(
        ctx, stack.modules, stack.infos, local, n_microbatches, loss_fn, kind=schedule or "1f1b"
    )
    step = pipe.step(local, return_outputs=True)
    loss, outputs, has_last = step.loss, step.outputs, pipe.has_last_stage
    if has_last:
        value = outputs[head]
        result["head_type"] = type(value).__name__
        result["loss_rel"] = rel_err(loss, ref_loss)
        result["output_rel"] = rel_err(_full(value), ref_out[head][rows])
        if snapshot == "mean":
            got = outputs["hidden_states_snapshot"]
            result["snapshot_rel"] = rel_err(got, ref_out["hidden_states_snapshot"][:, rows])
    result["steps"] = stack.reports[0].steps
    result.update(_grad_report(stack.modules, ref_grads))
    result["all_params"] = sorted(ref_grads)
    result["graph_breaks"] = sum(dynamo_utils.counters["graph_break"].values()) - breaks_before
    result["new_graphs"] = dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before
    return result


TP2 = {"tensor_parallel": 2}
TWO_RANK_TP = {
    "tp=2 causal_lm": dict(mesh=TP2),
    "tp=2 classification": dict(mesh=TP2, kind="classification"),
    "tp=2 causal_lm chunked head, snapshots": dict(mesh=TP2, chunk_tokens=5, snapshot="mean"),
    "tp=2 causal_lm compile_sac": dict(mesh=TP2, compile_config="compile_sac"),
    "tp=2 classification compile_sac user order": dict(
        mesh=TP2, kind="classification", compile_config="compile_sac", user_order=True
    ),
}

FOUR_RANK_TP = {
    "dp_shard=2 x tp=2 causal_lm": dict(mesh={"data_parallel_shard": 2, **TP2}),
    "dp_replicate=2 x tp=2 classification": dict(
        mesh={"data_parallel_replicate": 2, **TP2}, kind="classification"
    ),
    "pp=2 x tp=2 causal_lm 1f1b, snapshots": dict(
        mesh={"pipeline_parallel": 2, **TP2}, schedule="1f1b", num_layers=4, snapshot="mean"
    ),
    "pp=2 x tp=2 classification 1f1b": dict(
        mesh={"pipeline_parallel": 2, **TP2}, kind="classification", schedule="1f1b"
    ),
}


def tp_errors() -> dict:
    """The user errors of tensor parallelism under tp=2, each message (``None``: no error).

    Shape errors come from the builder before any communication; the sequence-length
    error comes from the forward on every rank alike, after which a right batch still
    trains (no rank was left waiting in a collective).
    """
    ctx = DeviceMeshParameters(**TP2).build()
    errors: dict = {}

    def record(name, fn):
        try:
            fn()
        except ValueError as err:
            errors[name] = str(err)
        else:
            errors[name] = None

    bad_shapes = {
        "num_attention_heads": dict(num_attention_heads=3, num_key_value_heads=3),
        "num_key_value_heads": dict(num_key_value_heads=1),
        "intermediate_size": dict(intermediate_size=63),
        "vocab split": dict(split_vocab_size={"text": 41, "code": 23, "special": 8}),
    }
    for name, overrides in bad_shapes.items():
        params = _params("causal_lm", **overrides)
        record(name, lambda params=params: build_stage_modules(params, None, ctx))
    from d9d.compile import load_compile_config

    record(
        "float8 on cpu",
        lambda: build_stage_modules(
            _params("causal_lm"), load_compile_config("compile_sac_float8"), ctx
        ),
    )
    record(
        "compile_full_ac",
        lambda: build_stage_modules(
            _params("causal_lm"), load_compile_config("compile_full_ac"), ctx
        ),
    )
    record(
        "compile_memory_budget user order",
        lambda: _build_user_order(
            ctx, "causal_lm", 2, load_compile_config("compile_memory_budget"), "no"
        ),
    )
    (model,) = build_stage_modules(_params("causal_lm"), None, ctx).modules
    batch = _batch("causal_lm")
    odd = {k: v[:, :7] for k, v in batch.items()}
    record("sequence length", lambda: model(**odd))
    loss = model(**batch)["logps"].sum()
    loss.backward()
    errors["good_step_loss"] = loss.item()
    return errors


def _mismatched(models, reference: dict[str, torch.Tensor]) -> dict:
    names, mismatched = [], []
    for model in models:
        for name, value in model.state_dict().items():
            names.append(name)
            if not torch.equal(_full(value), reference[name]):
                mismatched.append(name)
    return {"names": sorted(names), "mismatched": mismatched}


def checkpoint_job(workdir: str, folder: str) -> dict:
    """DCP and HF checkpoints across tp=2 / dp_shard=2 / one process (2 ranks).

    ``folder/single`` holds a DCP checkpoint written by one process before the job; the
    job loads it under tp=2, writes ``folder/tp2`` from tp=2 and loads that under
    dp_shard=2, and exports/reloads an HF folder under tp=2. The test process then loads
    ``folder/tp2`` and the HF folder in one process.
    """
    from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint
    from d9d.module.model.qwen3_dense.hf_io import load_hf_checkpoint, save_hf_checkpoint

    reference = reference_model().state_dict()
    results = {}

    def fresh(mesh: dict):
        ctx = DeviceMeshParameters(**mesh).build()
        return build_stage_modules(_params("causal_lm"), None, ctx, init="reset", seed=5).modules

    def single_to_tp():
        models = fresh(TP2)
        load_model_checkpoint(models, f"{folder}/single")
        return _mismatched(models, reference)

    def tp_to_dp_shard():
        models = fresh(TP2)
        load_model_checkpoint(models, f"{folder}/single")
        save_model_checkpoint(models, f"{folder}/tp2")
        dist.barrier()
        loaded = fresh({"data_parallel_shard": 2})
        load_model_checkpoint(loaded, f"{folder}/tp2")
        return _mismatched(loaded, reference)

    def hf_round_trip():
        models = fresh(TP2)
        load_model_checkpoint(models, f"{folder}/single")
        save_hf_checkpoint(models[0], f"{folder}/hf")
        dist.barrier()
        loaded = fresh(TP2)
        load_hf_checkpoint(loaded[0], f"{folder}/hf")
        return _mismatched(loaded, reference)

    def seeded_init():
        # init="reset" gives the same weights under tp=2 as in one process.
        plain = build_stage_modules(_params("causal_lm"), None, None, init="reset", seed=5)
        return _mismatched(fresh(TP2), plain.modules[0].state_dict())

    results["seeded init tp=2 == one process"] = guarded(seeded_init)
    results["single -> tp=2"] = guarded(single_to_tp)
    results["tp=2 -> dp_shard=2"] = guarded(tp_to_dp_shard)
    results["hf under tp=2"] = guarded(hf_round_trip)
    return results


def two_rank_job(workdir: str) -> dict:
    """Every two-rank tensor-parallel scenario, one result per name."""
    results = {name: guarded(run_tp_layout, **spec) for name, spec in TWO_RANK_TP.items()}
    results["errors"] = guarded(tp_errors)
    return results


def four_rank_job(workdir: str) -> dict:
    """Every four-rank tensor-parallel scenario, one result per name."""
    return {name: guarded(run_tp_layout, **spec) for name, spec in FOUR_RANK_TP.items()}
