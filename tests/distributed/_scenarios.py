"""Scenarios run inside spawned gloo ranks (see ``tests.helpers.run_spawned``).

Every layout is compared with a single-process reference model holding the same
weights and fed the same *global* batch: the reference is rebuilt on every rank (the
models are tiny), so no tensors need to travel to the test process. Results are worst
absolute differences, collected per layout so a test can name the layout that broke.
"""

import functools

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint
from d9d.core.dist_context import DeviceMeshParameters
from d9d.dataset import token_pooling_mask_from_attention_mask
from d9d.module.parallelism.api import parallelize_hsdp
from d9d.module.parallelism.float8 import precompute_float8_all_gather_scales
from d9d.module.parallelism.model.qwen3_dense import (
    parallelize_qwen3_dense_for_causal_lm,
    parallelize_qwen3_dense_for_classification,
    parallelize_qwen3_dense_model,
)
from d9d.pipelining.api import PipelineStageInfo
from d9d.pipelining.loss import CausalLMLoss, ClassificationLoss
from d9d.pipelining.schedule import build_pipeline_schedule
from d9d.pipelining.step import build_schedule
from d9d.stack import build_stage_modules
from tests.helpers import (
    DIST_MODEL_KW,
    fresh_subdir,
    guarded,
    kind_model_cls,
    kind_params,
    reference_model,
    reference_step,
)

GLOBAL_BATCH = 8
SEQ = 8
VOCAB = 96  # the conftest default splits: text 80 + special 16
MODEL_KW = DIST_MODEL_KW


def _model_params(kind: str):
    return kind_params(kind, **MODEL_KW)


_model_cls = kind_model_cls


def _global_batch(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    # Right padding of varying length, so microbatches and data shards hold different
    # numbers of valid tokens (a per-microbatch or per-rank mean would then be wrong).
    lengths = torch.tensor([8, 3, 7, 6, 8, 2, 6, 4])
    attention = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    # Odd rows step their positions by 2: RoPE only sees relative positions, so (unlike a
    # constant offset) this changes the outputs if position_ids missed a stage.
    position_ids = torch.arange(SEQ)[None, :] * (1 + torch.arange(GLOBAL_BATCH)[:, None] % 2)
    batch = {
        "input_ids": ids[:, :-1].contiguous(),
        "position_ids": position_ids,
        "hidden_states_agg_mask": attention,
    }
    if kind == "causal_lm":
        labels = ids[:, 1:].clone()
        labels[attention == 0] = -100
        batch["labels"] = labels
    else:
        batch["pooling_mask"] = token_pooling_mask_from_attention_mask(attention, "last")
        batch["labels"] = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
        batch["labels"][3] = -100  # an ignored row
    return batch


def _reference(kind: str, snapshot: str, compile_config=None):
    """The single-process model, its loss and gradients on the whole global batch."""
    model = reference_model(_model_cls(kind), _model_params(kind), snapshot)
    if compile_config is not None:
        from d9d.compile.float8 import convert_linears_to_float8

        convert_linears_to_float8(model, compile_config.float8)
    batch = _global_batch(kind)
    out, loss, grads = reference_step(model, batch)
    return model, batch, out, loss, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _build_stages(ctx, kind, snapshot, ref_state, compile_config=None, stages_per_rank=1):
    """This rank's stages through the one builder, then the reference weights loaded."""
    stack = build_stage_modules(
        _model_params(kind),
        compile_config,
        ctx,
        num_stages_per_rank=stages_per_rank,
        hidden_states_snapshot_mode=snapshot,
        init="reset",
        seed=1000 + dist.get_rank(),  # a different init: the load must overwrite it
    )
    if ref_state is not None:
        for model in stack.modules:
            # set_model_state_dict replaces the values of the dict it is given by sharded
            # copies: hand it a shallow copy so the reference stays plain.
            set_model_state_dict(
                model,
                dict(ref_state),
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
    return stack.modules


def _grad_diffs(models, ref_grads) -> tuple[float, list[str]]:
    worst = 0.0
    names = []
    for model in models:
        for name, param in model.named_parameters():
            grad = _full(param.grad)
            worst = max(worst, (grad - ref_grads[name]).abs().max().item())
            names.append(name)
    return worst, names


def _compile_config(spec: str | dict | None):
    from d9d.compile import CompileConfig, load_compile_config

    if isinstance(spec, str):
        return load_compile_config(spec)
    return None if spec is None else CompileConfig.model_validate(spec)


def run_layout(
    mesh: dict,
    kind: str = "causal_lm",
    schedule: str | None = None,
    stages_per_rank: int = 1,
    n_microbatches: int = 2,
    snapshot: str = "no",
    compile_config: str | dict | None = None,
) -> dict:
    """One training step under ``mesh``; worst differences to the reference.

    Args:
        mesh: ``DeviceMeshParameters`` fields.
        kind: ``"causal_lm"`` or ``"classification"``.
        schedule: A ``PipelineScheduleKind`` value, or ``None`` without pipelining
            (the single-stage step object).
        stages_per_rank: Pipeline stages per rank.
        n_microbatches: Microbatches per step.
        snapshot: Hidden-state snapshot mode.
        compile_config: A preset name or the fields of a ``CompileConfig``.
    """
    import torch._dynamo.utils as dynamo_utils

    config = _compile_config(compile_config)
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    breaks_before = sum(dynamo_utils.counters["graph_break"].values())
    ref, batch, ref_out, ref_loss, ref_grads = _reference(kind, snapshot)
    ctx = DeviceMeshParameters(**mesh).build()
    local_batch = GLOBAL_BATCH // ctx.dp_size
    rows = slice(ctx.dp_rank * local_batch, (ctx.dp_rank + 1) * local_batch)
    local = {k: v[rows] for k, v in batch.items()}
    num_stages = ctx.pp_size * stages_per_rank
    infos = [PipelineStageInfo(s, num_stages) for s in ctx.local_pipeline_stages(stages_per_rank)]
    models = _build_stages(ctx, kind, snapshot, ref.state_dict(), config, stages_per_rank)
    loss_fn = CausalLMLoss() if kind == "causal_lm" else ClassificationLoss()
    result: dict = {"layout": mesh, "schedule": schedule}
    # The one step object: the single stage (gradient accumulation over the
    # microbatches, one FSDP reduction) or the pipeline schedule.
    pipe = build_schedule(
        ctx, models, infos, local, n_microbatches, loss_fn, kind=schedule or "1f1b"
    )
    step = pipe.step(local, return_outputs=True)
    loss, outputs, has_last = step.loss, step.outputs, pipe.has_last_stage
    if has_last:
        result["loss_diff"] = (loss - ref_loss).abs().item()
        head = "logps" if kind == "causal_lm" else "scores"
        ref_rows = (
            ref_out[head][rows] if kind == "causal_lm" else _pooled_rows(batch, ref_out, rows)
        )
        result["output_diff"] = (outputs[head] - ref_rows).abs().max().item()
        if snapshot == "mean":
            snap = outputs["hidden_states_snapshot"]
            ref_snap = ref_out["hidden_states_snapshot"][:, rows]
            assert snap.shape == ref_snap.shape, (snap.shape, ref_snap.shape)
            result["snapshot_diff"] = (snap.float() - ref_snap).abs().max().item()
    result["grad_diff"], result["checked_params"] = _grad_diffs(models, ref_grads)
    result["all_params"] = sorted(ref_grads)
    result["graph_breaks"] = sum(dynamo_utils.counters["graph_break"].values()) - breaks_before
    result["new_graphs"] = dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before

    # Forward only, through the same step object: the same global loss, gradients untouched.
    def local_grads() -> list[torch.Tensor]:
        # Local shards: torch.equal on DTensors would run a collective per parameter.
        grads = [p.grad for m in models for p in m.parameters()]
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    before = [g.clone() for g in local_grads()]
    evaluated = pipe.eval(local)
    result["eval_loss_diff"] = (evaluated.loss - ref_loss).abs().item()
    result["eval_kept_grads"] = all(
        g is not None and torch.equal(a, g) for a, g in zip(before, local_grads(), strict=True)
    )
    result["reshard_after_forward"] = _reshard_flags(models)
    result["stage_input_dtypes"] = [
        {k: str(v.dtype) for k, v in m.infer_stage_inputs_from_pipeline_inputs(local, 2).items()}
        for m in models
    ]
    return result


def _reshard_flags(models) -> dict[str, list[bool]]:
    """Whether each FSDP unit frees its gathered parameters after forward."""
    from torch.distributed.fsdp import fully_shard

    def reshards(module) -> bool:
        return fully_shard.state(module)._fsdp_param_group.post_forward_mesh_info is not None

    flags: dict[str, list[bool]] = {"embedding": [], "layers": [], "norm+head": []}
    for model in models:
        backbone = model.model
        if hasattr(backbone, "embed_tokens"):
            flags["embedding"].append(reshards(backbone.embed_tokens))
        flags["layers"].extend(reshards(layer) for layer in backbone.layers.values())
        if hasattr(backbone, "norm"):
            flags["norm+head"].append(reshards(backbone.norm))
    return flags


def _pooled_rows(batch, ref_out, rows) -> torch.Tensor:
    # Scores are gathered in (batch, seq) order; with "last" pooling, one per row.
    per_row = batch["pooling_mask"].sum(1)
    assert bool((per_row == 1).all())
    return ref_out["scores"][rows]


def expected_errors() -> dict:
    """The user errors of the distributed API, each as (raised?, message)."""
    results = {}

    def record(name, fn):
        try:
            fn()
        except ValueError as err:
            results[name] = str(err)
        else:
            results[name] = None

    world = dist.get_world_size()
    record("bad_product", lambda: DeviceMeshParameters(data_parallel_shard=world + 1).build())
    for field in ("tensor_parallel", "context_parallel_shard", "context_parallel_replicate"):
        ctx = DeviceMeshParameters(**{field: world}).build()
        info = PipelineStageInfo(0, 1)
        for fn_name, fn, kind in (
            ("causal_lm", parallelize_qwen3_dense_for_causal_lm, "causal_lm"),
            ("classification", parallelize_qwen3_dense_for_classification, "classification"),
            ("model", parallelize_qwen3_dense_model, None),
        ):
            with torch.device("meta"):
                model = _model_cls(kind or "causal_lm")(
                    _model_params(kind or "causal_lm"),
                    info,
                    hidden_states_snapshot_mode="no",
                    enable_checkpointing=False,
                )
            target = model.model if kind is None else model
            record(
                f"{field}:{fn_name}",
                lambda fn=fn, ctx=ctx, target=target, info=info: fn(ctx, target, info),
            )
    ctx = DeviceMeshParameters(pipeline_parallel=world).build()
    two_per_rank = [PipelineStageInfo(s, 2 * world) for s in ctx.local_pipeline_stages(2)]
    with torch.device("meta"):
        stages = [
            _model_cls("causal_lm")(
                _model_params("causal_lm"),
                i,
                hidden_states_snapshot_mode="no",
                enable_checkpointing=False,
            )
            for i in two_per_rank
        ]
    batch = {"input_ids": torch.zeros(4, SEQ, dtype=torch.long)}
    record(
        "gpipe_with_two_stages_per_rank",
        lambda: build_pipeline_schedule(
            ctx, stages, two_per_rank, batch, 2, CausalLMLoss(), kind="gpipe"
        ),
    )
    record(
        "stages_not_looped",
        lambda: build_pipeline_schedule(
            ctx, stages[::-1], two_per_rank[::-1], batch, 2, CausalLMLoss(), kind="interleaved_1f1b"
        ),
    )
    unnamed = DeviceMesh("cpu", list(range(world)))
    record("unnamed_mesh", lambda: parallelize_hsdp(torch.nn.Linear(4, 4), unnamed))
    return results


def schedule_batch_checks() -> dict:
    """A pp=2 1F1B schedule built for 8 rows, given wrong batches: every rank must raise
    the same ValueError before any communication, and a right batch must still work."""
    from d9d.module.model.qwen3_dense.validation import validate_batch

    ctx = DeviceMeshParameters(pipeline_parallel=2).build()
    params = _model_params("causal_lm")
    stack = build_stage_modules(params, None, ctx)
    batch = _global_batch("causal_lm")  # 8 rows
    pipe = build_pipeline_schedule(
        ctx,
        stack.modules,
        stack.infos,
        batch,
        4,
        CausalLMLoss(),
        kind="1f1b",
        validate_batch=functools.partial(validate_batch, params),
    )
    bad_token = dict(batch, input_ids=batch["input_ids"].clone())
    bad_token["input_ids"][5, 3] = VOCAB + 7
    bad_labels = dict(batch, labels=batch["labels"][:, :-1])
    cases = {
        "6 rows": {k: v[:6] for k, v in batch.items()},
        "16 rows": {k: torch.cat([v, v]) for k, v in batch.items()},
        "labels shape": bad_labels,
        "missing position_ids": {k: v for k, v in batch.items() if k != "position_ids"},
        "token out of range": bad_token,
        "float input_ids": dict(batch, input_ids=batch["input_ids"].float()),
    }
    errors = {}
    for name, bad in cases.items():
        try:
            pipe.step(bad)
        except ValueError as err:
            errors[name] = str(err)
        else:
            errors[name] = None
    result = pipe.step(batch)
    dist.barrier()
    return {
        "errors": errors,
        "good_step_loss": result.loss.item(),
    }


def checkpoint_round_trip(
    workdir: str, save_mesh: dict, load_mesh: dict, load_stages_per_rank: int = 1
) -> dict:
    """Saves under ``save_mesh``, loads under ``load_mesh``; compares every tensor."""
    ref, *_ = _reference("causal_lm", "no")
    ref_state = ref.state_dict()
    path = fresh_subdir(workdir, "ckpt")

    ctx = DeviceMeshParameters(**save_mesh).build()
    saved = _build_stages(ctx, "causal_lm", "no", ref_state)
    save_model_checkpoint(saved, path)
    dist.barrier()

    ctx = DeviceMeshParameters(**load_mesh).build()
    loaded = _build_stages(ctx, "causal_lm", "no", None, stages_per_rank=load_stages_per_rank)
    # What to_empty may leave in the non-persistent RoPE tables: the load must rebuild them.
    for model in loaded:
        for buffer in model.buffers():
            buffer.fill_(float("nan"))
    load_model_checkpoint(loaded, path)
    rope_ok = all(
        torch.equal(got, want)
        for model in loaded
        for got, want in zip(model.buffers(), ref.buffers(), strict=True)
    )
    mismatched, names = [], []
    for model in loaded:
        for name, value in model.state_dict().items():
            names.append(name)
            if not torch.equal(_full(value), ref_state[name]):
                mismatched.append(name)
    from torch.distributed.checkpoint import FileSystemReader

    stored = sorted(FileSystemReader(path).read_metadata().state_dict_metadata)
    return {
        "mismatched": mismatched,
        "rope_tables_rebuilt": rope_ok,
        "loaded_names": names,
        "stored_keys": stored,
        "reference_keys": sorted(ref_state),
    }


def float8_all_gather(steps: int = 2) -> dict:
    """dp_shard=2 with float8 linears all-gathered in float8, against a float8 reference.

    Each step: forward/backward, SGD update, then the scale precompute that a trainer
    runs after every optimizer step with ``enable_fsdp_float8_all_gather``.
    """
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from d9d.compile import CompileConfig

    def float8_config(all_gather: bool) -> CompileConfig:
        return CompileConfig.model_validate(
            {"float8": {"enabled": True, "enable_fsdp_float8_all_gather": all_gather}}
        )

    gathered_dtypes: list[str] = []
    original = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    @functools.wraps(original)  # FSDP inspects the hook's signature
    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        gathered_dtypes.append(str(out[0][0].dtype))
        return out

    WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = recording
    try:
        ref, batch, *_ = _reference("causal_lm", "no", compile_config=float8_config(False))
        ctx = DeviceMeshParameters(data_parallel_shard=2).build()
        shards = [slice(r * 4, r * 4 + 4) for r in range(2)]
        local = {k: v[shards[ctx.dp_rank]] for k, v in batch.items()}
        (model,) = _build_stages(
            ctx, "causal_lm", "no", ref.state_dict(), compile_config=float8_config(True)
        )
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        count = (batch["labels"] != -100).sum()
        loss_diffs, grad_diffs, precomputed = [], [], []
        for _ in range(steps):
            # Tensorwise float8 scales each *activation* by its own amax, so the
            # reference must see the same per-rank batches: one forward/backward per data
            # shard, gradients accumulated (exactly what FSDP's summed reduction does).
            ref_opt.zero_grad()
            ref_loss = torch.zeros(())
            for rows in shards:
                part = ref(**{k: v[rows] for k, v in batch.items()})["logps"].sum() / count
                part.backward()
                ref_loss += part.detach()
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}
            loss = model(**local)["logps"].sum() / count
            loss.backward()
            loss = loss.detach()
            dist.all_reduce(loss)
            loss_diffs.append((loss - ref_loss).abs().item())
            grad_diffs.append(_grad_diffs([model], ref_grads)[0])
            ref_opt.step()
            opt.step()
            opt.zero_grad()
            precompute_float8_all_gather_scales(model)
            precomputed.append(
                all(
                    p._local_tensor._precomputed_scale is not None
                    for p in model.parameters()
                    if isinstance(p._local_tensor, WeightWithDynamicFloat8CastTensor)
                )
            )
    finally:
        WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = original
    return {
        "loss_diffs": loss_diffs,
        "grad_diffs": grad_diffs,
        "gathered_dtypes": sorted(set(gathered_dtypes)),
        "num_float8_gathers": len(gathered_dtypes),
        "scales_precomputed": precomputed,
    }


def hsdp_two_replicate_dims() -> dict:
    """``parallelize_hsdp`` replicating over two dims of size 2 (flattened into one).

    Each rank feeds different data; the gradient must be the *sum* over the 4 ranks.
    """
    from d9d.core.dist_context import DENSE_DOMAIN
    from d9d.module.parallelism.model.qwen3_dense import HSDP_DIMS

    ctx = DeviceMeshParameters(data_parallel_replicate=2, context_parallel_replicate=2).build()
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4, bias=False)
    inputs = torch.randn(dist.get_world_size(), 3, 8)
    expected = torch.func.grad(lambda w: sum((x @ w.T).pow(2).sum() for x in inputs))(
        reference.weight.detach()
    )
    layer = torch.nn.Linear(8, 4, bias=False)
    layer.load_state_dict(reference.state_dict())
    parallelize_hsdp(layer, ctx.mesh_for(DENSE_DOMAIN)[HSDP_DIMS])
    layer(inputs[dist.get_rank()]).pow(2).sum().backward()
    weight = layer.weight
    return {
        "placements": [str(p) for p in weight.placements],
        "mesh_shape": list(weight.device_mesh.shape),
        "grad_diff": (_full(weight.grad) - expected).abs().max().item(),
    }


TWO_RANK_LAYOUTS = {
    "dp_shard=2": dict(mesh=dict(data_parallel_shard=2)),
    "dp_replicate=2": dict(mesh=dict(data_parallel_replicate=2)),
    "pp=2 gpipe": dict(mesh=dict(pipeline_parallel=2), schedule="gpipe"),
    "pp=2 1f1b": dict(mesh=dict(pipeline_parallel=2), schedule="1f1b", n_microbatches=4),
    "pp=2 interleaved 2 stages/rank": dict(
        mesh=dict(pipeline_parallel=2),
        schedule="interleaved_1f1b",
        stages_per_rank=2,
        n_microbatches=4,
    ),
    "pp=2 1f1b classification + mean snapshots": dict(
        mesh=dict(pipeline_parallel=2),
        kind="classification",
        schedule="1f1b",
        snapshot="mean",
    ),
    "pp=2 interleaved causal LM + mean snapshots": dict(
        mesh=dict(pipeline_parallel=2),
        schedule="interleaved_1f1b",
        stages_per_rank=2,
        snapshot="mean",
    ),
    "dp_shard=2 compile_sac": dict(mesh=dict(data_parallel_shard=2), compile_config="compile_sac"),
    "pp=2 1f1b compile_sac": dict(
        mesh=dict(pipeline_parallel=2), schedule="1f1b", compile_config="compile_sac"
    ),
}

BF16 = {"fsdp": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}
TWO_RANK_LAYOUTS["pp=2 1f1b bf16 params"] = dict(
    mesh=dict(pipeline_parallel=2), schedule="1f1b", compile_config=BF16
)

FOUR_RANK_LAYOUTS = {
    "dp_replicate=2 x dp_shard=2": dict(
        mesh=dict(data_parallel_replicate=2, data_parallel_shard=2)
    ),
    "pp=2 x dp_shard=2 1f1b": dict(
        mesh=dict(pipeline_parallel=2, data_parallel_shard=2), schedule="1f1b"
    ),
}


def two_rank_job(workdir: str, names: list[str]) -> dict:
    """Every 2-rank layout in ``names``, the user errors and a checkpoint round trip."""
    results = {name: guarded(run_layout, **TWO_RANK_LAYOUTS[name]) for name in names}
    results["errors"] = guarded(expected_errors)
    results["schedule batch checks"] = guarded(schedule_batch_checks)
    results["float8 all-gather dp_shard=2"] = guarded(float8_all_gather)
    results["checkpoint dp_shard=2 -> pp=2"] = guarded(
        checkpoint_round_trip, workdir, dict(data_parallel_shard=2), dict(pipeline_parallel=2)
    )
    return results


def four_rank_job(workdir: str, names: list[str]) -> dict:
    """Every 4-rank layout in ``names`` and a checkpoint round trip."""
    results = {name: guarded(run_layout, **FOUR_RANK_LAYOUTS[name]) for name in names}
    results["hsdp dp_replicate=2 x cp_replicate=2"] = guarded(hsdp_two_replicate_dims)
    results["checkpoint dp_replicate=2 x dp_shard=2 -> pp=2 (2 stages/rank) x dp_shard=2"] = (
        guarded(
            checkpoint_round_trip,
            workdir,
            dict(data_parallel_replicate=2, data_parallel_shard=2),
            dict(pipeline_parallel=2, data_parallel_shard=2),
            load_stages_per_rank=2,
        )
    )
    return results
