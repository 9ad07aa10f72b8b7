"""Context-parallel scenarios run inside spawned gloo ranks (``tests.helpers.run_spawned``).

Each layout is compared with a single-process reference holding the same weights and fed
the same global batch, rebuilt on every rank (the model is tiny). A CP rank holds the
head-tail shard of its rows (``shard_batch_for_context_parallel``); its per-token
outputs are compared with the reference's at the global indices of its tokens. Results
are relative errors (``tests.helpers.rel_err``) of the loss, the logps of every token
and every gathered gradient, plus counts of the context-parallel collectives.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from d9d.core.dist_context import DeviceMeshParameters
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.parallelism.context_parallel import (
    head_tail_indices,
    shard_batch_for_context_parallel,
)
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import build_schedule
from d9d.stack import build_stage_modules
from tests import helpers
from tests.helpers import guarded, rel_err, small_causal_lm_params

GLOBAL_BATCH = 4
SEQ = 16  # 4 chunks of 4 tokens at cp=2; 8 local tokens, 4 per rank under tp=2 as well
VOCAB = 96
MODEL_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query, and divisible by tensor_parallel=2
    head_dim=8,
    max_position_ids=64,
)
SNAPSHOT_WEIGHT = 0.1

# Packed rows: documents cross the chunk boundaries (every 4 tokens) and the rank
# boundary (chunk 0 on rank 0, chunk 1 on rank 1), a continuation starts at 40, the last
# row is one document that starts at position 5.
PACKED_A = torch.tensor(
    [
        list(range(16)),
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2],
        [0, 1, 2, *range(40, 53)],
        list(range(5, 21)),
    ]
)
PACKED_B = torch.tensor(
    [
        [*range(8), *range(8)],
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        list(range(16)),
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    ]
)


def _params(num_layers: int):
    return small_causal_lm_params(num_hidden_layers=num_layers, **MODEL_KW)


def make_batch(seed: int = 0, positions: torch.Tensor | None = PACKED_A) -> dict:
    """A global batch: random ids, a few ignored labels, an aggregation mask."""
    gen = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    ids[0, 1], ids[1, 2] = VOCAB - 1, 0  # both ends of the vocabulary
    labels = ids[:, 1:].clone()
    labels[2, -3:] = -100  # right padding
    labels[1, 0] = -100
    batch = {
        "input_ids": ids[:, :-1].contiguous(),
        "labels": labels,
        "hidden_states_agg_mask": (labels != -100).long(),
    }
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def reference_model(num_layers: int = 2, snapshot: str = "no") -> Qwen3DenseForCausalLM:
    """The single-process model every scenario compares with (same weights everywhere)."""
    return helpers.reference_model(Qwen3DenseForCausalLM, _params(num_layers), snapshot)


def _reference_step(model, batch: dict, snapshot: str) -> dict:
    model.zero_grad(set_to_none=True)
    if snapshot == "no":
        out, loss, grads = helpers.reference_step(model, batch)
    else:
        # A loss on the snapshot as well (the layout's step adds the same term).
        out = model(**batch)
        loss = out["logps"].sum() / (batch["labels"] != -100).sum()
        loss = loss + SNAPSHOT_WEIGHT * out["hidden_states_snapshot"].sum()
        loss.backward()
        loss = loss.detach()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {
        "loss": loss,
        "logps": out["logps"].detach(),
        "snapshot": out["hidden_states_snapshot"],
        "grads": grads,
    }


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class _CollectiveCounter:
    """Counts the all-gathers and reduce-scatters run on the context-parallel group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.counts = {"kv_gather": 0, "position_gather": 0, "kv_reduce_scatter": 0}

    @contextlib.contextmanager
    def active(self):
        gather, scatter = dist.all_gather_into_tensor, dist.reduce_scatter_tensor

        def counted_gather(output, input, group=None, async_op=False):
            if group is self.group:
                key = "kv_gather" if input.is_floating_point() else "position_gather"
                self.counts[key] += 1
            return gather(output, input, group=group, async_op=async_op)

        def counted_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if group is self.group:
                self.counts["kv_reduce_scatter"] += 1
            return scatter(output, input, op=op, group=group, async_op=async_op)

        dist.all_gather_into_tensor, dist.reduce_scatter_tensor = counted_gather, counted_scatter
        try:
            yield self.counts
        finally:
            dist.all_gather_into_tensor, dist.reduce_scatter_tensor = gather, scatter


def run_cp_layout(
    mesh: dict,
    *,
    packed: bool = True,
    schedule: str | None = None,
    compile_config: str | dict | None = None,
    snapshot: str = "no",
    num_layers: int = 2,
) -> dict:
    """Steps under ``mesh`` (one per batch) against the single-process reference.

    Two batches of different document layouts run one after the other (no optimizer
    step), so a compiled layer that recompiled for the second shows up. A float8 config
    is applied to the reference as well (its error against fp32 is reported too).
    """
    import torch._dynamo.utils as dynamo_utils

    from d9d.compile import CompileConfig, apply_compile_config, load_compile_config

    if isinstance(compile_config, dict):
        config = CompileConfig.model_validate(compile_config)
    else:
        config = load_compile_config(compile_config) if compile_config else None
    counters = dynamo_utils.counters
    ref = reference_model(num_layers, snapshot)
    fp32_ref = None
    if config is not None and config.float8.enabled:
        fp32_ref = reference_model(num_layers, snapshot)
        apply_compile_config(ref, config.model_copy(update={"compile": CompileConfig().compile}))
    ctx = DeviceMeshParameters(**mesh).build()
    stack = build_stage_modules(
        _params(num_layers),
        config,
        ctx,
        hidden_states_snapshot_mode=snapshot,
        init="reset",
        seed=77 + dist.get_rank(),  # a different init: the load must overwrite it
    )
    for model in stack.modules:
        set_model_state_dict(
            model, ref.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False)
        )
    per_rank = GLOBAL_BATCH // ctx.dp_size
    rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    tokens = head_tail_indices(SEQ, ctx.cp_size, ctx.cp_rank)
    batches = [make_batch(0, PACKED_A if packed else None), make_batch(1, PACKED_B)]
    counter = _CollectiveCounter(ctx.cp_group)
    pipe = None
    result: dict = {"steps": [], "tokens": tokens.tolist(), "rows": [rows.start, rows.stop]}
    graphs_after_first = None
    breaks_before = sum(counters["graph_break"].values())
    graphs_before = counters["stats"]["unique_graphs"]
    for index, batch in enumerate(batches):
        expected = _reference_step(ref, batch, snapshot)
        if fp32_ref is not None:
            exact = _reference_step(fp32_ref, batch, snapshot)
            result.setdefault("float8_vs_fp32", []).append(
                max(rel_err(expected["grads"][n], g) for n, g in exact["grads"].items())
            )
        local = shard_batch_for_context_parallel(
            {k: v[rows] for k, v in batch.items()}, ctx.cp_rank, ctx.cp_size
        )
        for model in stack.modules:
            model.zero_grad(set_to_none=True)
        step: dict = {}
        with counter.active() as counts:
            before = dict(counts)
            if snapshot == "mean":
                # A loss on the snapshot too, which the loss objects do not express.
                (model,) = stack.modules
                out = model(**local)
                count = (local["labels"] != -100).sum().float()
                dist.all_reduce(count, group=ctx.dp_cp_group)
                # Every CP rank holds the same whole-row snapshot; each rank's loss is one
                # term of the global loss, so each counts 1 / cp of it.
                snap = out["hidden_states_snapshot"]
                loss = out["logps"].sum() / count + SNAPSHOT_WEIGHT * snap.sum() / ctx.cp_size
                step["snapshot_rel"] = rel_err(snap, expected["snapshot"][:, rows])
                loss.backward()
                loss = loss.detach()
                dist.all_reduce(loss, group=ctx.dp_cp_group)
                logps, has_last = out["logps"], True
            else:
                if pipe is None:
                    # The one step object: the single stage, or a pipeline schedule.
                    microbatches = 2 if schedule else 1
                    pipe = build_schedule(
                        ctx,
                        stack.modules,
                        stack.infos,
                        local,
                        microbatches,
                        CausalLMLoss(),
                        kind=schedule or "1f1b",
                    )
                out = pipe.step(local, return_outputs=True)
                loss, has_last = out.loss, pipe.has_last_stage
                logps = out.outputs["logps"] if has_last else None
            step["collectives"] = {k: counts[k] - before[k] for k in counts}
        if has_last:
            step["loss_rel"] = rel_err(loss, expected["loss"])
            step["logps_rel"] = rel_err(logps, expected["logps"][rows][:, tokens])
        worst, incomplete = 0.0, []
        for model in stack.modules:
            for name, param in model.named_parameters():
                if param.grad is None:
                    incomplete.append(f"{name}: no gradient")
                    continue
                if isinstance(param, DTensor) and param.grad.placements != param.placements:
                    incomplete.append(f"{name}: {param.grad.placements} vs {param.placements}")
                worst = max(worst, rel_err(_full(param.grad), expected["grads"][name]))
        step["grad_rel"] = worst
        step["incomplete_grads"] = incomplete
        result["steps"].append(step)
        if index == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    result["checked_params"] = sorted(n for m in stack.modules for n, _ in m.named_parameters())
    result["all_params"] = sorted(n for n, _ in ref.named_parameters())
    result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks_before
    result["first_step_graphs"] = graphs_after_first - graphs_before
    result["later_new_graphs"] = counters["stats"]["unique_graphs"] - graphs_after_first
    result["placements"] = {
        name: [str(p) for p in param.placements]
        for m in stack.modules
        for name, param in m.named_parameters()
        if isinstance(param, DTensor)
    }
    result["mesh_dims"] = {
        name: list(param.device_mesh.mesh_dim_names or ())
        for m in stack.modules
        for name, param in m.named_parameters()
        if isinstance(param, DTensor)
    }
    return result


CP2 = {"context_parallel_shard": 2}
TWO_RANK_CP = {
    "cp=2": dict(mesh=CP2, packed=False),
    "cp=2 packed rows": dict(mesh=CP2),
    "cp=2 snapshots": dict(mesh=CP2, snapshot="mean"),
    "cp_replicate=2 packed rows": dict(mesh={"context_parallel_replicate": 2}),
    "cp=2 compile_sac": dict(mesh=CP2, compile_config="compile_sac"),
    # Eager float8 (tensorwise): each CP rank scales its own tokens' activations.
    "cp=2 float8": dict(mesh=CP2, compile_config={"name": "float8", "float8": {"enabled": True}}),
}
FOUR_RANK_CP = {
    "dp_shard=2 x cp=2": dict(mesh={"data_parallel_shard": 2, **CP2}),
    "pp=2 x cp=2 1f1b": dict(mesh={"pipeline_parallel": 2, **CP2}, schedule="1f1b", num_layers=4),
    "tp=2 x cp=2": dict(mesh={"tensor_parallel": 2, **CP2}),
}


def cp_errors() -> dict:
    """The user errors under cp=2, each message (``None``: no error), per rank.

    Every one is raised before any collective, on every rank alike: afterwards a right
    batch still trains (no rank was left waiting).
    """
    from tests.helpers import small_classification_params

    ctx = DeviceMeshParameters(**CP2).build()
    errors: dict = {}

    def record(name, fn):
        try:
            fn()
        except ValueError as err:
            errors[name] = str(err)
        else:
            errors[name] = None

    batch = make_batch()
    record(
        "shard seq",
        lambda: shard_batch_for_context_parallel(
            {k: v[:, :14] for k, v in batch.items()}, ctx.cp_rank, 2
        ),
    )
    (model,) = build_stage_modules(_params(2), None, ctx).modules
    local = shard_batch_for_context_parallel(batch, ctx.cp_rank, 2)
    record("model local seq", lambda: model(**{k: v[:, :7] for k, v in local.items()}))
    classification = small_classification_params(num_labels=3, **MODEL_KW)
    record("classification", lambda: build_stage_modules(classification, None, ctx))

    def flex_training():
        model.set_attention_backend("flex")
        try:
            model(**local)
        finally:
            model.set_attention_backend("auto")

    record("flex backward on cpu", flex_training)
    loss = model(**local)["logps"].sum()
    loss.backward()
    errors["good_step_loss"] = loss.item()
    return errors


def checkpoint_job(workdir: str, folder: str) -> dict:
    """DCP checkpoints between one process and cp=2 (2 ranks), exactly.

    ``folder/single`` holds a checkpoint written by one process before the job; the job
    loads it under cp=2 and writes ``folder/cp2`` from cp=2 (from other weights the test
    process then checks in one process).
    """
    from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint

    reference = reference_model().state_dict()

    def fresh():
        ctx = DeviceMeshParameters(**CP2).build()
        return build_stage_modules(_params(2), None, ctx, init="reset", seed=5).modules

    def single_to_cp():
        models = fresh()
        load_model_checkpoint(models, f"{folder}/single")
        mismatched = [
            name
            for name, value in models[0].state_dict().items()
            if not torch.equal(_full(value), reference[name])
        ]
        save_model_checkpoint(models, f"{folder}/cp2")
        return {"mismatched": mismatched, "names": sorted(models[0].state_dict())}

    return {"single -> cp=2": guarded(single_to_cp)}


def two_rank_job(workdir: str, folder: str) -> dict:
    """Every two-rank context-parallel scenario, one result per name."""
    results = {name: guarded(run_cp_layout, **spec) for name, spec in TWO_RANK_CP.items()}
    results["errors"] = guarded(cp_errors)
    results.update(checkpoint_job(workdir, folder))
    return results


def four_rank_job(workdir: str) -> dict:
    """Every four-rank context-parallel scenario, one result per name."""
    return {name: guarded(run_cp_layout, **spec) for name, spec in FOUR_RANK_CP.items()}
