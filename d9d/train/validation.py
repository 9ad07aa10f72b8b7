"""The held-out loss of a training run (``[eval]``), under every layout.

The held-out documents are split off the training corpus (``eval.fraction``, by
``d9d.dataset.heldout.split_heldout``: a seeded rule on the document indices, the same
on every rank) or read from their own files (``eval.paths``), packed like the training
data, and evaluated through the training step object's forward-only path
(``eval`` of ``d9d.pipelining.step.build_schedule``'s schedule: the pipeline's own
forward-only schedule under pipeline parallelism). Each data-parallel rank evaluates its
slice of every held-out batch; the schedule returns each batch's global mean and count,
so the result is the mean NLL over every valid held-out token evaluated, the same under
every layout up to summation order.

Forward only, under ``torch.no_grad`` rather than ``torch.inference_mode``: tensors made
in inference mode can never enter autograd afterwards, and an evaluation creates some
that training reuses (FSDP2's unsharded parameters, lazily built buffers), so the next
training step would fail. ``no_grad`` keeps no graph either, and activation
checkpointing has nothing to recompute without a backward. The compiled layers get one
extra graph for this mode (dynamo guards on grad mode and ``training``), compiled at the
first evaluation and cached; the training graph stays as it is and is not recompiled.

An evaluation leaves training exactly as it was: the RNG states are restored, the
training data cursor is not touched (the held-out batches are a fixed pass of their
own), every module gets its train/eval flag back, gradients are kept and the FSDP2
units are resharded (both by the schedule's ``eval``).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from d9d.core.checks import inputs_prevalidated
from d9d.core.constants import IGNORE_INDEX
from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.heldout import HeldOutBatches, split_heldout
from d9d.train.config import EvalSection


@dataclass
class EvalMetrics:
    """What one evaluation reports (one log line, one JSON line).

    Attributes:
        step: Optimizer steps done when it ran.
        eval_loss: Mean NLL over every valid held-out token evaluated.
        eval_perplexity: ``exp(eval_loss)``.
        eval_tokens: Valid tokens (predictions) evaluated, over all ranks.
        eval_seconds: Wall time of the evaluation.
    """

    step: int
    eval_loss: float
    eval_perplexity: float
    eval_tokens: int
    eval_seconds: float

    def line(self, total_steps: int) -> str:
        """The human-readable log line (``eval at step ...``; step lines start ``step``)."""
        return (
            f"eval at step {self.step:>{len(str(total_steps))}}/{total_steps} | "
            f"eval_loss {self.eval_loss:.4f} | perplexity {self.eval_perplexity:.2f} | "
            f"{self.eval_tokens:,} tokens | {self.eval_seconds:.2f} s"
        )


def split_eval_corpus(
    section: EvalSection,
    corpus: DocumentCorpus,
    read_files: Callable[[tuple[str, ...]], DocumentCorpus],
    seed: int,
) -> tuple[DocumentCorpus, DocumentCorpus | None]:
    """The training corpus and the held-out corpus ``[eval]`` describes.

    With ``fraction`` set the held-out documents leave the training corpus even when
    ``enabled = false``, so that switching evaluation off does not change the training
    data.

    Args:
        section: ``[eval]``.
        corpus: The documents of ``[data]``.
        read_files: Reads files as ``[data]`` says (token or text files).
        seed: The run's seed.

    Returns:
        ``(training, held_out)``; ``held_out`` is ``None`` without evaluation.

    Raises:
        ValueError: If an ``eval.paths`` entry does not exist or cannot be read (naming
            the key).
    """
    if section.fraction is not None:
        return split_heldout(corpus, section.fraction, seed)
    if not section.active:
        return corpus, None
    missing = [path for path in section.paths if not Path(path).exists()]
    if missing:
        raise ValueError(f"eval.paths: {', '.join(missing)} does not exist")
    try:
        return corpus, read_files(section.paths)
    except ValueError as err:
        raise ValueError(f"eval.paths: {err}") from err


def eval_source(section: EvalSection) -> str:
    """How messages name the held-out set (its config key)."""
    if section.fraction is not None:
        return f"the held-out set (eval.fraction={section.fraction})"
    return f"the held-out set (eval.paths={list(section.paths)})"


class Validator:
    """Evaluates the held-out loss on this rank's share of the held-out batches.

    Args:
        batches: The held-out batches (this rank's slices).
        schedule: The training step object (``eval(batch)`` runs the forward only).
        modules: This rank's stage modules (put in eval mode while evaluating).
        device: Where the batches go.
        section: ``[eval]`` (``interval``).
        total_steps: The run's steps (an evaluation always follows the last).
        prepare_batch: Turns a held-out batch into the step object's input, as the
            training loop does with its batches (``None``: moves it to ``device``).
    """

    def __init__(
        self,
        batches: HeldOutBatches,
        schedule,
        modules: list[nn.Module],
        device: torch.device,
        section: EvalSection,
        total_steps: int,
        prepare_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        self.batches = batches
        self.schedule = schedule
        self.modules = modules
        self.device = device
        self.interval = section.interval
        self.total_steps = total_steps
        self.last_local_tokens = 0
        self._prepare = prepare_batch or (lambda b: {k: v.to(device) for k, v in b.items()})

    def due(self, step: int) -> bool:
        """Whether an evaluation follows step ``step``."""
        return step == self.total_steps or bool(self.interval and step % self.interval == 0)

    def run(self, step: int) -> EvalMetrics:
        """Evaluates every held-out batch of one pass (every rank calls this).

        Args:
            step: The optimizer steps done (recorded with the result).

        Returns:
            The held-out loss, the same on every rank.
        """
        started = time.perf_counter()
        weighted = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        local_tokens = 0
        flags = [(m, m.training) for module in self.modules for m in module.modules()]
        # Training's RNG stream continues as if no evaluation had run (nothing in a
        # causal LM's forward draws from it today; a dropout would).
        accelerator = self.device.type != "cpu"
        fork = torch.random.fork_rng(
            devices=[self.device] if accelerator else [],
            # Unused without devices (the CPU generator is always forked).
            device_type=self.device.type if accelerator else "cuda",
        )
        try:
            with fork, inputs_prevalidated():
                for module in self.modules:
                    module.eval()
                for batch in self.batches:
                    local_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
                    result = self.schedule.eval(self._prepare(batch))
                    # The batch's global mean times its global count: its global sum.
                    weighted += result.loss.double() * result.num_items.double()
                    tokens += result.num_items.double()
        finally:
            for module, training in flags:
                module.training = training
        loss = (weighted / tokens).item()
        self.last_local_tokens = local_tokens
        return EvalMetrics(
            step=step,
            eval_loss=loss,
            eval_perplexity=math.exp(loss) if loss < 700 else math.inf,
            eval_tokens=round(tokens.item()),
            eval_seconds=time.perf_counter() - started,
        )
