"""The one training/eval step: forward (+ backward) over microbatches, normalised globally.

Every caller (the training loop, the validation, the profiling harness, the tests) runs
its steps through a schedule object with the same contract, so the loss normalisation
is written once:

* :class:`SingleStageSchedule` (here) runs a module that holds the whole model;
* ``d9d.pipelining.schedule.PipelineSchedule`` runs pipeline stages over
  ``torch.distributed.pipelining``.

Both take the whole local batch (``input_ids``, the loss target and side inputs such as
``position_ids``), split it into ``n_microbatches``, sum the loss object's per-microbatch
sums and divide by the loss object's count of valid items over the *global* batch (all
microbatches, all data-parallel ranks and, under context parallelism, every rank's share
of the tokens). Data- and context-parallel gradients are summed (not averaged), so the
result is exactly the single-device gradient of the global mean.
``step`` also runs the backward; ``eval`` runs the forward only, under ``torch.no_grad``.

:func:`build_schedule` picks the right one for a ``d9d.stack.StageModules``-style set of
stages.
"""

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from d9d.core.checks import inputs_prevalidated
from d9d.core.dist_context import DistributedContext
from d9d.pipelining.loss import PipelineLoss

BatchValidator = Callable[[Mapping[str, torch.Tensor]], None]


@dataclass
class StepResult:
    """What one ``step`` or ``eval`` of a schedule returns.

    Attributes:
        loss: The global mean loss (fp32, 0-d, detached), the same on every rank.
        num_items: The count the mean is over (valid tokens or rows of the global batch,
            fp32, 0-d), the same on every rank; ``loss * num_items`` is the global sum.
        outputs: The last stage's outputs merged over microbatches, when asked for
            (``None`` on ranks without the last stage).
    """

    loss: torch.Tensor
    num_items: torch.Tensor
    outputs: dict[str, torch.Tensor] | None = None


class BatchContract:
    """What a schedule refuses before any communication: the checks shared by both kinds.

    Args:
        loss: The loss object (its ``target_key`` must be in every batch).
        n_microbatches: Microbatches per step.
        example_shapes: Key -> shape of the batches the schedule was built for, or
            ``None`` to accept any shape whose rows split into the microbatches.
        validate_batch: Value checks of a whole batch (one host sync), after which the
            microbatches run inside ``inputs_prevalidated()``.
    """

    def __init__(
        self,
        loss: PipelineLoss,
        n_microbatches: int,
        example_shapes: dict[str, tuple[int, ...]] | None,
        validate_batch: BatchValidator | None,
    ):
        self.loss = loss
        self.n_microbatches = n_microbatches
        self.example_shapes = example_shapes
        self.validate_batch = validate_batch

    def check(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raises ``ValueError`` for a batch this schedule cannot run (same on every rank)."""
        required = {"input_ids", self.loss.target_key}
        if self.example_shapes is None:
            missing = sorted(required - batch.keys())
            if missing:
                raise ValueError(f"the batch has no {missing} (keys: {sorted(batch)})")
            rows = batch["input_ids"].shape[0] if batch["input_ids"].dim() else 0
            if rows < self.n_microbatches or rows % self.n_microbatches:
                raise ValueError(
                    f"batch size {rows} does not split into n_microbatches="
                    f"{self.n_microbatches} equal microbatches"
                )
        else:
            self._check_against_example(batch, required)
        if self.validate_batch is not None:
            self.validate_batch(batch)

    def _check_against_example(self, batch: Mapping[str, torch.Tensor], required: set) -> None:
        expected = self.example_shapes
        assert expected is not None
        missing = sorted((required | expected.keys()) - batch.keys())
        unexpected = sorted(batch.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"the batch keys {sorted(batch)} differ from those the schedule was built "
                f"for {sorted(expected)}: missing {missing}, unexpected {unexpected}"
            )
        rows = batch["input_ids"].shape[0] if batch["input_ids"].dim() else None
        expected_rows = expected["input_ids"][0]
        if rows != expected_rows:
            raise ValueError(
                f"batch size {rows} does not match the schedule's: it was built for "
                f"{expected_rows} rows (n_microbatches={self.n_microbatches} of "
                f"{expected_rows // self.n_microbatches} rows); build a schedule for "
                "this batch size, or pad the batch"
            )
        wrong = {
            key: (tuple(batch[key].shape), shape)
            for key, shape in expected.items()
            if tuple(batch[key].shape) != shape
        }
        if wrong:
            details = ", ".join(
                f"{key} {got} (expected {want})" for key, (got, want) in wrong.items()
            )
            raise ValueError(
                f"batch shapes differ from the example batch the schedule was built for "
                f"(n_microbatches={self.n_microbatches}): {details}"
            )

    def prevalidated(self) -> contextlib.AbstractContextManager:
        """The context the microbatches run in (skips per-call value checks if validated)."""
        if self.validate_batch is not None:
            return inputs_prevalidated()
        return contextlib.nullcontext()


def _all_reduce(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
    return value


def global_count(
    loss: PipelineLoss,
    target: torch.Tensor,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The loss object's count over the global batch (summed over ``group``), at least 1.

    Args:
        loss: The loss object.
        target: This rank's whole target (all its microbatches).
        device: Where the count lives (the collective's device).
        group: The ranks holding different tokens (``None``: this process alone).
    """
    count = loss.count(target).to(device, torch.float32)
    return _all_reduce(count, group).clamp_min(1.0)


def _loss_group(dist_context: DistributedContext | None) -> dist.ProcessGroup | None:
    # The ranks whose batches together make the global batch: data-parallel ranks read
    # different rows, context-parallel ranks different tokens of them.
    return dist_context.dp_cp_group if dist_context is not None else None


def reshard_after_eval(modules: list[nn.Module]) -> None:
    """Frees the parameters FSDP2 units gathered in a forward-only pass.

    Units that keep their parameters after forward (``reshard_after_forward=False``: the
    norm and head, every unit under pipelining) are resharded by their backward; without
    one they would stay gathered, and ``module.parameters()`` would list the unsharded
    parameters (without their gradients) until the next backward.
    """
    for module in modules:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def _split(batch: Mapping[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    rows = batch["input_ids"].shape[0] // n
    return [{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()} for i in range(n)]


def _merge(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    merged = {}
    for key in chunks[0]:
        values = [chunk[key] for chunk in chunks]
        if values[0] is None:
            merged[key] = None
            continue
        # Snapshots are (layers, batch, hidden): their batch dim is 1.
        dim = 1 if key == "hidden_states_snapshot" else 0
        merged[key] = torch.cat([v.detach() for v in values], dim=dim)
    return merged


class SingleStageSchedule:
    """The step object of a module that holds the whole model (no pipeline).

    The sibling of ``PipelineSchedule``: the same ``step`` / ``eval`` contract and the
    same loss normalisation. Under FSDP2 the gradients are reduced once per step (after
    the last microbatch), as the pipeline schedule does.

    Build it with :func:`build_schedule` (or directly).
    """

    def __init__(
        self,
        module: nn.Module,
        loss: PipelineLoss,
        *,
        n_microbatches: int = 1,
        dist_context: DistributedContext | None = None,
        example_batch: Mapping[str, torch.Tensor] | None = None,
        validate_batch: BatchValidator | None = None,
    ):
        """Wraps ``module``.

        Args:
            module: The model (FSDP2-wrapped or plain), with the first and last stage.
            loss: The loss of the model's outputs.
            n_microbatches: Microbatches per step (gradient accumulation).
            dist_context: The distributed context (``None``: one plain process).
            example_batch: When given, every batch must have its keys and shapes.
            validate_batch: Checks a whole batch once per step (e.g.
                ``functools.partial(validate_batch, params)``); the microbatches then
                skip their per-call value checks.

        Raises:
            ValueError: For ``n_microbatches < 1``.
        """
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
        self.module = module
        self.n_microbatches = n_microbatches
        self._dist_context = dist_context
        shapes = (
            {key: tuple(value.shape) for key, value in example_batch.items()}
            if example_batch is not None
            else None
        )
        self._contract = BatchContract(loss, n_microbatches, shapes, validate_batch)
        self._loss = loss
        # The module gets the keys its forward takes (labels for a causal LM's head).
        self._accepted = frozenset(inspect.signature(module.forward).parameters)

    @property
    def has_last_stage(self) -> bool:
        """Always ``True``: the module holds the whole model."""
        return True

    def _device(self, batch: Mapping[str, torch.Tensor]) -> torch.device:
        if self._dist_context is not None:
            return self._dist_context.device
        return batch["input_ids"].device

    def _run(
        self, batch: Mapping[str, torch.Tensor], backward: bool, return_outputs: bool
    ) -> StepResult:
        self._contract.check(batch)
        device = self._device(batch)
        group = _loss_group(self._dist_context)
        target_key = self._loss.target_key
        count = global_count(self._loss, batch[target_key], device, group)
        micro = _split(batch, self.n_microbatches)
        total = torch.zeros((), dtype=torch.float32, device=device)
        outputs = []
        fsdp = isinstance(self.module, FSDPModule)
        grad_mode = contextlib.nullcontext() if backward else torch.no_grad()
        with grad_mode, self._contract.prevalidated():
            for index, inputs in enumerate(micro):
                if backward and fsdp:
                    # One gradient reduction per step, after the last microbatch.
                    self.module.set_requires_gradient_sync(index == len(micro) - 1)
                out = self.module(**{k: v for k, v in inputs.items() if k in self._accepted})
                loss = self._loss(out, inputs[target_key]) / count
                if backward:
                    loss.backward()
                total += loss.detach().float()
                if return_outputs:
                    outputs.append(out)
        if not backward:
            reshard_after_eval([self.module])
        _all_reduce(total, group)
        merged = _merge(outputs) if return_outputs else None
        return StepResult(loss=total, num_items=count, outputs=merged)

    def step(self, batch: Mapping[str, torch.Tensor], return_outputs: bool = False) -> StepResult:
        """Forward and backward over every microbatch of ``batch``.

        Gradients accumulate into the module; call the optimizer afterwards.

        Args:
            batch: This data-parallel rank's batch (``input_ids``, the loss target, side
                inputs such as ``position_ids``).
            return_outputs: Also return the outputs, merged over microbatches.

        Returns:
            The global mean loss and its count (and the outputs, if asked for).

        Raises:
            ValueError: Before any communication, for a batch the schedule refuses.
        """
        return self._run(batch, backward=True, return_outputs=return_outputs)

    def eval(self, batch: Mapping[str, torch.Tensor], return_outputs: bool = False) -> StepResult:
        """Forward only (``torch.no_grad``) over every microbatch; no gradient is touched.

        The module's train/eval mode is the caller's (a causal LM has no dropout).

        Args:
            batch: As for :meth:`step`.
            return_outputs: Also return the outputs, merged over microbatches.

        Returns:
            The global mean loss and its count.
        """
        return self._run(batch, backward=False, return_outputs=return_outputs)


def build_schedule(
    dist_context: DistributedContext | None,
    stage_modules: list[nn.Module],
    stage_infos: list,
    example_batch: Mapping[str, torch.Tensor],
    n_microbatches: int,
    loss: PipelineLoss,
    kind: str = "1f1b",
    validate_batch: BatchValidator | None = None,
):
    """The step object for this rank's stages: a pipeline schedule or the single stage.

    Args:
        dist_context: The distributed context (``None``: one plain process).
        stage_modules: This rank's stage modules (``d9d.stack.StageModules.modules``).
        stage_infos: Their ``PipelineStageInfo``.
        example_batch: A batch shaped like the ones ``step`` / ``eval`` will get; later
            batches must have its keys and shapes.
        n_microbatches: Microbatches per step.
        loss: The loss of the last stage.
        kind: The pipeline schedule (``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``);
            ignored for a single stage.
        validate_batch: Whole-batch value checks, run once per step.

    Returns:
        A ``PipelineSchedule`` when the model is split into several stages, else a
        :class:`SingleStageSchedule`.
    """
    num_stages = stage_infos[0].num_stages if stage_infos else 1
    if num_stages > 1:
        from d9d.pipelining.schedule import build_pipeline_schedule

        if dist_context is None:
            raise ValueError(f"{num_stages} pipeline stages need a distributed context")
        return build_pipeline_schedule(
            dist_context,
            stage_modules,
            stage_infos,
            dict(example_batch),
            n_microbatches,
            loss,
            kind=kind,
            validate_batch=validate_batch,
        )
    (module,) = stage_modules
    return SingleStageSchedule(
        module,
        loss,
        n_microbatches=n_microbatches,
        dist_context=dist_context,
        example_batch=example_batch,
        validate_batch=validate_batch,
    )
