"""Pipeline schedules over ``torch.distributed.pipelining`` for d9d stage modules.

d9d stage modules take named inputs and return dicts; ``torch.distributed.pipelining``
sends positional tensors between stages. ``build_pipeline_schedule`` bridges the two:

* between stages travel ``hidden_states`` and, in snapshot mode ``"mean"``,
  ``hidden_states_snapshot`` (shapes from the modules' ``infer_stage_*`` methods, so no
  shape-probing forward is needed);
* the first stage gets ``input_ids``;
* every other key of the batch (``labels``, ``position_ids``,
  ``hidden_states_agg_mask``, ``pooling_mask``, ...) is split into microbatches and
  handed to *every* stage, each taking the keys its ``forward`` accepts;
* the last stage's dict goes to a ``PipelineLoss``, normalised by the global count.

Every rank of a pipeline calls ``PipelineSchedule.step`` with the same local batch.
"""

import inspect
from collections.abc import Callable, Mapping
from enum import StrEnum

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.microbatch import TensorChunkSpec
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from d9d.core.dist_context import DistributedContext
from d9d.pipelining.api import ModuleSupportsPipelining, PipelineStageInfo
from d9d.pipelining.loss import PipelineLoss
from d9d.pipelining.step import BatchContract, StepResult, global_count, reshard_after_eval

SNAPSHOT_KEY = "hidden_states_snapshot"


class PipelineScheduleKind(StrEnum):
    """Supported schedules.

    Attributes:
        gpipe: All forwards, then all backwards (one stage per rank).
        one_f_one_b: 1F1B: one forward, one backward in steady state (one stage per rank).
        interleaved_1f1b: Interleaved 1F1B (several stages per rank, looped placement).
    """

    gpipe = "gpipe"
    one_f_one_b = "1f1b"
    interleaved_1f1b = "interleaved_1f1b"


_SCHEDULES = {
    PipelineScheduleKind.gpipe: ScheduleGPipe,
    PipelineScheduleKind.one_f_one_b: Schedule1F1B,
    PipelineScheduleKind.interleaved_1f1b: ScheduleInterleaved1F1B,
}


class _DictPipelineStage(PipelineStage):
    """A ``PipelineStage`` that calls its module with names and unpacks its dict.

    The module itself (usually the FSDP root of the stage) stays ``submod``, so
    ``PipelineStage``'s FSDP handling (one gradient reduction per step, not per
    microbatch) still applies.
    """

    def __init__(
        self,
        module: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        group: dist.ProcessGroup,
        input_meta: dict[str, torch.Tensor],
        output_meta: dict[str, torch.Tensor],
    ):
        """Builds the stage with static metadata (no shape-probing forward).

        Args:
            module: The stage module.
            stage_index: Global index of the stage.
            num_stages: Number of stages of the pipeline.
            device: Device of this rank.
            group: The pipeline process group.
            input_meta: What the stage receives positionally, by name, in order.
            output_meta: What the stage returns, by name, in order.
        """
        self._input_names = tuple(input_meta)
        self.output_names = tuple(output_meta)
        self._accepted = frozenset(inspect.signature(module.forward).parameters)
        super().__init__(
            module,
            stage_index,
            num_stages,
            device,
            input_args=tuple(input_meta.values()),
            output_args=tuple(output_meta.values()),
            group=group,
        )

    def forward_maybe_with_nosync(self, *args, **kwargs):
        """Calls the module with named inputs; returns its outputs as a tuple.

        Overrides the hook ``PipelineStage.forward_one_chunk`` calls the module through:
        ``args`` are the positional stage inputs (``input_ids`` on the first stage, the
        received activations elsewhere), ``kwargs`` this microbatch's side inputs, of
        which the module gets those its ``forward`` accepts.
        """
        named = dict(zip(self._input_names, args, strict=True))
        named.update((k, v) for k, v in kwargs.items() if k in self._accepted)
        out = self.submod(**named)
        # Always a tuple (the last stage too: torch detaches its outputs one by one after
        # the backward); PipelineSchedule turns the last stage's tuple back into a dict.
        return tuple(out[name] for name in self.output_names)


def _meta_for_grad(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Floating activations carry gradients back to the previous stage; the static
    # metadata must say so, or the received buffers would not require grad.
    return {name: t.detach().requires_grad_(t.is_floating_point()) for name, t in tensors.items()}


# The name this result had before the single-stage sibling shared it.
PipelineStepResult = StepResult


class PipelineSchedule:
    """Runs one training (or forward-only) step of a pipeline.

    Build it with ``build_pipeline_schedule``. The sibling of
    ``d9d.pipelining.step.SingleStageSchedule``: the same ``step`` / ``eval`` contract,
    the same checks and the same loss normalisation.
    """

    def __init__(
        self,
        dist_context: DistributedContext,
        make_stages: Callable[[], list[_DictPipelineStage]],
        kind: PipelineScheduleKind,
        n_microbatches: int,
        loss: PipelineLoss,
        example_shapes: dict[str, tuple[int, ...]],
        validate_batch: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
    ):
        """Builds the torch schedule over the stages (use ``build_pipeline_schedule``)."""
        self._dist_context = dist_context
        self._make_stages = make_stages
        self._kind = kind
        self._stages = make_stages()
        self._loss = loss
        self.n_microbatches = n_microbatches
        self._contract = BatchContract(loss, n_microbatches, example_shapes, validate_batch)
        self._global_count = torch.ones((), device=dist_context.device)
        # The last stage's dict is merged per key; snapshots are (layers, batch, hidden).
        self._output_names = self._stages[-1].output_names
        self._schedule = self._torch_schedule(self._stages)
        # Forward-only steps run on a schedule of their own (built at the first eval):
        # torch 2.13 re-initialises a schedule whose mode switches between train and
        # eval, re-running its metadata inference and clearing the stages' gradients.
        self._eval_schedule = None

    def _torch_schedule(self, stages: list[_DictPipelineStage]):
        merge_spec = tuple(
            TensorChunkSpec(1 if name == SNAPSHOT_KEY else 0) for name in self._output_names
        )
        schedule_cls = _SCHEDULES[self._kind]
        return schedule_cls(
            stages if self._kind is PipelineScheduleKind.interleaved_1f1b else stages[0],
            n_microbatches=self.n_microbatches,
            loss_fn=self._normalised_loss,
            output_merge_spec=merge_spec,
            # The loss is already normalised by the global count: no per-microbatch scaling.
            scale_grads=False,
        )

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank runs the last stage (and so gets the merged outputs)."""
        return any(stage.is_last for stage in self._stages)

    def _normalised_loss(
        self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor
    ) -> torch.Tensor:
        named = dict(zip(self._output_names, outputs, strict=True))
        return self._loss(named, target) / self._global_count

    def _run(
        self, batch: dict[str, torch.Tensor], backward: bool, return_outputs: bool
    ) -> StepResult:
        self._contract.check(batch)
        ctx = self._dist_context
        target = batch[self._loss.target_key]
        # Every rank holding different tokens (data- and context-parallel) counts its own.
        self._global_count = global_count(self._loss, target, ctx.device, ctx.dp_cp_group)
        side_inputs = {k: v for k, v in batch.items() if k != "input_ids"}
        has_first = any(stage.is_first for stage in self._stages)
        args = (batch["input_ids"],) if has_first else ()
        losses: list[torch.Tensor] = []
        if backward:
            with self._contract.prevalidated():
                merged = self._schedule.step(
                    *args,
                    target=target,
                    losses=losses,
                    return_outputs=return_outputs,
                    **side_inputs,
                )
        else:
            if self._eval_schedule is None:
                self._eval_schedule = self._torch_schedule(self._make_stages())
            modules = [stage.submod for stage in self._stages]
            # The eval schedule's one-time set-up clears FSDP gradients: keep them.
            kept = [(p, p.grad) for m in modules for p in m.parameters()]
            with torch.no_grad(), self._contract.prevalidated():
                merged = self._eval_schedule.eval(
                    *args, target=target, losses=losses, **side_inputs
                )
            reshard_after_eval(modules)
            for param, grad in kept:
                param.grad = grad
        total = torch.zeros((), dtype=torch.float32, device=ctx.device)
        if self.has_last_stage:
            total += torch.stack(losses).sum().detach().float()
        # The last stage's ranks hold the loss: sum it over the data- and context-parallel
        # ranks, then share it along the pipeline so that every rank reports the same number.
        dist.all_reduce(total, group=ctx.dp_cp_group)
        if ctx.pp_size > 1:
            dist.all_reduce(total, group=ctx.pp_group)
        outputs = None
        if return_outputs and self.has_last_stage and merged is not None:
            outputs = dict(zip(self._output_names, merged, strict=True))
        return StepResult(loss=total, num_items=self._global_count, outputs=outputs)

    def step(self, batch: dict[str, torch.Tensor], return_outputs: bool = False) -> StepResult:
        """Runs forward and backward over all microbatches of ``batch``.

        Gradients are accumulated into the stage modules (FSDP reduces them once, at
        the end); call the optimizer afterwards.

        Args:
            batch: This data-parallel rank's batch: ``input_ids`` ``(batch, seq)``, the
                loss target under ``loss.target_key`` and any per-sample side inputs.
                Every rank of the pipeline passes the same batch.
            return_outputs: Also return the last stage's outputs, merged over
                microbatches (``hidden_states_snapshot`` along its batch dim 1).

        Returns:
            The step result: the global mean loss on every rank.

        Raises:
            ValueError: Before any communication, on every rank given the same batch: if
                a key is missing or unexpected, if a shape differs from the example batch
                the schedule was built for (the stages' buffers are sized by it), or if
                the batch's values fail ``validate_batch``.
        """
        return self._run(batch, backward=True, return_outputs=return_outputs)

    def eval(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """Runs the forward only (``torch.no_grad``) over all microbatches of ``batch``.

        Uses the torch schedule's forward-only path; no gradient is touched. The stage
        modules' train/eval mode is the caller's.

        Args:
            batch: As for :meth:`step`.

        Returns:
            The global mean loss and its count, on every rank.

        Raises:
            ValueError: As for :meth:`step`.
        """
        return self._run(batch, backward=False, return_outputs=False)


def build_pipeline_schedule(
    dist_context: DistributedContext,
    stage_modules: list[nn.Module],
    stage_infos: list[PipelineStageInfo],
    example_batch: dict[str, torch.Tensor],
    n_microbatches: int,
    loss: PipelineLoss,
    kind: PipelineScheduleKind | str = PipelineScheduleKind.one_f_one_b,
    validate_batch: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> PipelineSchedule:
    """Builds the pipeline stages of this rank and a schedule over them.

    Args:
        dist_context: The distributed context (its ``pp`` group links the stages).
        stage_modules: This rank's stage modules (already parallelized and
            initialised), in the order of ``stage_infos``.
        stage_infos: Their stage infos (``dist_context.local_pipeline_stages`` gives
            the indices: rank ``r`` runs stages ``r, r + pp, ...``).
        example_batch: A batch shaped like the ones ``step`` will get (at least
            ``input_ids`` and the loss target; ``pooling_mask`` for classification);
            only shapes are read. ``step`` refuses batches of other keys or shapes.
        n_microbatches: Microbatches per step (must divide the batch size).
        loss: The loss of the last stage.
        kind: Which schedule to run.
        validate_batch: Checks a whole batch once per step (e.g. ``functools.partial(
            d9d.module.model.qwen3_dense.validation.validate_batch, params)``); the
            stages then skip their per-microbatch value checks (host syncs).

    Returns:
        The schedule.

    Raises:
        ValueError: On a stage/rank mismatch or a schedule that does not fit the
            number of stages per rank.
    """
    kind = PipelineScheduleKind(kind)
    if len(stage_modules) != len(stage_infos) or not stage_modules:
        raise ValueError("stage_modules and stage_infos must be non-empty and of equal length")
    num_stages = stage_infos[0].num_stages
    expected = dist_context.local_pipeline_stages(len(stage_infos))
    if [info.current_stage for info in stage_infos] != expected:
        raise ValueError(
            f"this rank must run stages {expected} (looped placement), got "
            f"{[info.current_stage for info in stage_infos]}"
        )
    if num_stages != dist_context.pp_size * len(stage_infos):
        raise ValueError(
            f"{num_stages} stages do not fit {dist_context.pp_size} pipeline ranks x "
            f"{len(stage_infos)} stages per rank"
        )
    if "input_ids" not in example_batch or example_batch["input_ids"].dim() != 2:
        raise ValueError("example_batch must hold input_ids of shape (batch, seq)")
    rows = example_batch["input_ids"].shape[0]
    if n_microbatches < 1 or rows % n_microbatches:
        raise ValueError(f"batch size {rows} is not divisible by n_microbatches={n_microbatches}")
    multi = kind is PipelineScheduleKind.interleaved_1f1b
    if not multi and len(stage_infos) != 1:
        raise ValueError(f"schedule {kind.value!r} runs exactly one stage per rank")
    metas = []
    for module in stage_modules:
        if not isinstance(module, ModuleSupportsPipelining):
            raise ValueError(f"{type(module).__name__} does not implement ModuleSupportsPipelining")
        inputs = module.infer_stage_inputs_from_pipeline_inputs(example_batch, n_microbatches)
        outputs = module.infer_stage_outputs_from_pipeline_inputs(example_batch, n_microbatches)
        metas.append((_meta_for_grad(inputs), _meta_for_grad(outputs)))

    def make_stages() -> list[_DictPipelineStage]:
        return [
            _DictPipelineStage(
                module,
                info.current_stage,
                num_stages,
                dist_context.device,
                dist_context.pp_group,
                inputs,
                outputs,
            )
            for module, info, (inputs, outputs) in zip(
                stage_modules, stage_infos, metas, strict=True
            )
        ]

    example_shapes = {key: tuple(value.shape) for key, value in example_batch.items()}
    return PipelineSchedule(
        dist_context, make_stages, kind, n_microbatches, loss, example_shapes, validate_batch
    )
