"""Losses for pipelined training, normalised by a *global* count.

A pipeline computes the loss one microbatch at a time on the last stage, and data
parallelism splits the batch again. Averaging per microbatch (or per rank) would weight
microbatches with few valid tokens too much. These losses therefore return *sums* over
a microbatch; the schedule divides them by the count of valid items over the whole
global batch (all microbatches, all data-parallel ranks). Since FSDP sums gradients over
data-parallel ranks (see ``d9d.module.parallelism``), the result is exactly the
gradient of the single-device mean loss.
"""

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from d9d.core.constants import IGNORE_INDEX


@runtime_checkable
class PipelineLoss(Protocol):
    """A loss summed over one microbatch, plus the count it is averaged by.

    Attributes:
        target_key: Key of the pipeline inputs that holds the loss target.
    """

    target_key: str

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """Returns the number of items ``target`` contributes to the mean (a 0-d tensor)."""
        ...

    def __call__(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Returns the loss of one microbatch, summed (not averaged) over its items."""
        ...


class CausalLMLoss:
    """Mean per-token negative log-likelihood over the tokens whose label is not -100.

    Reads the model's ``"logps"`` (already exactly 0 at ignored positions).
    """

    target_key = "labels"

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """Number of labels that are not -100."""
        return (target != IGNORE_INDEX).sum()

    def __call__(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Sum of ``outputs["logps"]`` (fp32)."""
        return outputs["logps"].float().sum()


class ClassificationLoss:
    """Mean cross entropy over the rows whose label is not -100.

    The target holds one class per batch row (shape ``(batch,)``), so the pooling mask
    must select exactly one token per row (``"first"`` or ``"last"`` pooling).
    """

    target_key = "labels"

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """Number of labels that are not -100."""
        return (target != IGNORE_INDEX).sum()

    def __call__(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy of ``outputs["scores"]`` against ``target``.

        Raises:
            ValueError: If the number of scored rows differs from the number of labels.
        """
        scores = outputs["scores"]
        if scores.shape[0] != target.shape[0] or target.dim() != 1:
            raise ValueError(
                f"ClassificationLoss needs one label per scored row: got scores of shape "
                f"{tuple(scores.shape)} and labels of shape {tuple(target.shape)} "
                "(pool exactly one token per row)"
            )
        return F.cross_entropy(scores.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
