"""Snapshots of intermediate hidden states, aggregated per sequence."""

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor


class HiddenStatesAggregationMode(StrEnum):
    """How intermediate hidden states are snapshotted.

    Attributes:
        no: No snapshot; ``"hidden_states_snapshot"`` is ``None``.
        mean: Masked mean over the sequence of the embedding output and every layer output.
    """

    no = "no"
    mean = "mean"


class HiddenStatesAggregator(Protocol):
    """Collects hidden states of one stage and appends them to the incoming snapshot."""

    def add_hidden_states(self, hidden_states: torch.Tensor) -> None:
        """Records one ``(B, S, hidden)`` tensor."""
        ...

    def pack_with_snapshot(self, snapshot: torch.Tensor | None) -> torch.Tensor | None:
        """Returns ``cat([snapshot, stack(recorded)], 0)`` (or ``None`` in mode ``no``)."""
        ...


class _NoAggregator:
    def add_hidden_states(self, hidden_states: torch.Tensor) -> None:
        pass

    def pack_with_snapshot(self, snapshot: torch.Tensor | None) -> torch.Tensor | None:
        return None


class _MeanAggregator:
    def __init__(
        self,
        agg_mask: torch.Tensor,
        sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        mask = agg_mask.float()
        # Under context parallelism each rank holds part of every row: the mean's count
        # and sum are both over the whole row.
        self._sum_over_ranks = sum_over_ranks or (lambda t: t)
        count = self._sum_over_ranks(mask.sum(dim=1, keepdim=True))
        # (B, S, 1) weights that sum to one over the sequence of each row.
        self._weights = (mask / count.clamp_min(1.0)).unsqueeze(-1)
        self._collected: list[torch.Tensor] = []

    def add_hidden_states(self, hidden_states: torch.Tensor) -> None:
        if isinstance(hidden_states, DTensor):
            # Tensor parallelism shards the residual stream on the sequence; the snapshot
            # is whole on every rank (its gradient then arrives whole, not partial).
            hidden_states = hidden_states.full_tensor()
        if self._weights.shape[:2] != hidden_states.shape[:2]:
            # A (B, 1) or (1, S) mask would broadcast into a sum instead of a mean.
            raise ValueError(
                f"hidden_states_agg_mask shape {tuple(self._weights.shape[:2])} does not match "
                f"(batch, seq) = {tuple(hidden_states.shape[:2])}"
            )
        pooled = self._sum_over_ranks((hidden_states.float() * self._weights).sum(dim=1))
        self._collected.append(pooled.to(hidden_states.dtype))

    def pack_with_snapshot(self, snapshot: torch.Tensor | None) -> torch.Tensor | None:
        new = torch.stack(self._collected, dim=0)
        return new if snapshot is None else torch.cat([snapshot, new], dim=0)


def create_hidden_states_aggregator(
    mode: HiddenStatesAggregationMode,
    agg_mask: torch.Tensor | None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HiddenStatesAggregator:
    """Builds the aggregator for ``mode``.

    Args:
        mode: The snapshot mode.
        agg_mask: ``(B, S)`` mask of tokens to average over; required for ``mean``.
        sum_over_ranks: When the sequence is split over ranks (context parallelism), a
            differentiable sum over them: the means are then over whole rows and equal
            on every rank. ``None``: the rows are whole here.

    Raises:
        ValueError: If ``mode`` is ``mean`` and ``agg_mask`` is missing.
    """
    mode = HiddenStatesAggregationMode(mode)
    if mode is HiddenStatesAggregationMode.no:
        return _NoAggregator()
    if agg_mask is None:
        raise ValueError(
            "hidden_states_agg_mask is required when hidden_states_snapshot_mode='mean'"
        )
    if agg_mask.dim() != 2:
        raise ValueError(
            f"hidden_states_agg_mask must be (batch, seq), got shape {tuple(agg_mask.shape)}"
        )
    return _MeanAggregator(agg_mask, sum_over_ranks)
