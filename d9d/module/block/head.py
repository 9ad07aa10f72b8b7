"""Output heads: split language-model head (per-token NLL) and classification head."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from d9d.core.checks import check_token_range
from d9d.core.constants import IGNORE_INDEX
from d9d.module.block.chunked_nll import EAGER_NLL_KERNELS, NLLKernels, linear_nll

# Upper bound on the logits (in the head's dtype) the causal-LM loss keeps alive at once.
# Below it the logits are kept for backward (three head matmuls); above it they are
# recomputed chunk by chunk (four). 1 GiB keeps the bf16 logits of a 2048-token sequence
# at V=151936 (622 MB), chunks a 4096-token one (1.2 GB), and bounds any batch.
DEFAULT_LOGITS_CHUNK_BYTES = 2**30


class SplitLanguageModellingHead(nn.Module):
    """One bias-free linear per vocabulary split; returns the per-token NLL.

    Args:
        split_vocab_size: Size of each named split.
        split_order: Order of the splits in the global id space.
        hidden_size: Input width.
    """

    def __init__(self, split_vocab_size: dict[str, int], split_order: list[str], hidden_size: int):
        super().__init__()
        self.split_order = list(split_order)
        self.vocab_size = sum(split_vocab_size[name] for name in self.split_order)
        self.logits_chunk_bytes = DEFAULT_LOGITS_CHUNK_BYTES
        # Swapped for compiled kernels by d9d.compile when a compile preset is applied.
        self.nll_kernels: NLLKernels = EAGER_NLL_KERNELS
        self.lm_head = nn.ModuleDict(
            {
                name: nn.Linear(hidden_size, split_vocab_size[name], bias=False)
                for name in self.split_order
            }
        )

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Returns the concatenated logits ``(..., V)`` in the input dtype."""
        parts = [self.lm_head[name](hidden_states) for name in self.split_order]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Computes ``logsumexp(logits) - logits[label]`` in fp32, shape ``(B, S)``.

        Positions whose label is ``-100`` hold exactly ``0.0``. Logits are kept in the
        head's dtype and bounded by ``logits_chunk_bytes``: a batch whose logits fit keeps
        them for backward; a larger one is processed in chunks whose logits are
        recomputed in backward (see :mod:`d9d.module.block.chunked_nll`).
        """
        if labels.shape != hidden_states.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match hidden states "
                f"{tuple(hidden_states.shape[:-1])}"
            )
        check_token_range(labels, self.vocab_size, "labels", ignore_index=IGNORE_INDEX)
        linears = [self.lm_head[name] for name in self.split_order]
        if isinstance(linears[0].weight, DTensor):
            return self._vocab_parallel_nll(hidden_states, labels, linears)
        # Swapped linears (e.g. float8) must run through their own forward.
        if all(type(lin) is nn.Linear for lin in linears):
            bytes_per_token = self.vocab_size * hidden_states.element_size()
            return linear_nll(
                hidden_states,
                [lin.weight for lin in linears],
                labels,
                IGNORE_INDEX,
                chunk_tokens=max(1, self.logits_chunk_bytes // bytes_per_token),
                kernels=self.nll_kernels,
            )
        logits = self.logits(hidden_states)
        flat = logits.reshape(-1, logits.shape[-1])
        _, nll = self.nll_kernels.lse_and_nll(flat, labels.reshape(-1), IGNORE_INDEX)
        return nll.view(labels.shape).clone()  # not a view (see chunked_nll)

    def _vocab_parallel_nll(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, linears: list[nn.Linear]
    ) -> torch.Tensor:
        # Tensor parallelism: each split's rows (vocabulary) are sharded over the mesh and
        # ``hidden_states`` is the same on every rank. Labels become indices into this
        # rank's rows (-1 where another rank holds them); the loss reduces the max,
        # logsumexp and pick over the group, so full-vocabulary logits never exist.
        if any(type(lin) is not nn.Linear for lin in linears):
            raise ValueError(
                "the vocab-parallel LM-head loss needs plain nn.Linear heads (got "
                f"{sorted({type(lin).__name__ for lin in linears})}); keep the head out of "
                "float8 under tensor parallelism"
            )
        mesh = linears[0].weight.device_mesh
        rank = mesh.get_local_rank()
        weights = [lin.weight.to_local() for lin in linears]
        local_labels = torch.full_like(labels, -1)
        local_labels = local_labels.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
        offset, column = 0, 0
        for lin, weight in zip(linears, weights, strict=True):
            rows = weight.shape[0]
            start = offset + rank * rows
            owned = (labels >= start) & (labels < start + rows)
            local_labels = torch.where(owned, labels - start + column, local_labels)
            offset += lin.weight.shape[0]
            column += rows
        hidden = hidden_states
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(placements=[Replicate()]).to_local()
        bytes_per_token = column * hidden.element_size()
        return linear_nll(
            hidden,
            weights,
            local_labels,
            IGNORE_INDEX,
            chunk_tokens=max(1, self.logits_chunk_bytes // bytes_per_token),
            kernels=self.nll_kernels,
            group=mesh.get_group(),
        )

    def reset_parameters(self) -> None:
        """Re-initialises every split with ``nn.Linear`` defaults."""
        for lin in self.lm_head.values():
            lin.reset_parameters()


class ClassificationHead(nn.Module):
    """Dropout then a bias-free ``score`` linear, optionally reading only pooled tokens.

    Args:
        hidden_size: Input width.
        num_labels: Number of classes.
        dropout: Dropout probability before the linear.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Returns fp32 scores.

        With ``pooling_mask`` ``(B, S)``, the rows where it is 1 are gathered in
        (batch, seq) order, giving ``(N_selected, num_labels)``; without it every token is
        scored, giving ``(B, S, num_labels)``.
        """
        if pooling_mask is not None:
            if pooling_mask.shape != hidden_states.shape[:-1]:
                raise ValueError(
                    f"pooling_mask shape {tuple(pooling_mask.shape)} does not match hidden "
                    f"states {tuple(hidden_states.shape[:-1])}"
                )
            hidden_states = hidden_states[pooling_mask.bool()]
        return self.score(self.dropout(hidden_states)).float()

    def reset_parameters(self) -> None:
        """Re-initialises the score linear with ``nn.Linear`` defaults."""
        self.score.reset_parameters()
