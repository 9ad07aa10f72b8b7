"""Context parallelism: where a CP rank gets its tokens and how its attention sees the rest.

With context-parallel degree ``C``, every row of a batch is cut into ``2C`` equal chunks
and CP rank ``i`` holds chunks ``i`` and ``2C - 1 - i`` (head-tail balancing: under a
causal mask an early chunk attends to few keys and a late one to many, so each rank gets
one of each and the ranks do the same work). :func:`shard_batch_for_context_parallel`
is the one function that cuts a batch for a rank; ``position_ids`` keep the *global*
positions of the tokens (``arange(seq)`` when the batch has none), so RoPE and the
packed-document rule (a new document wherever a position is not the previous + 1) see
exactly what one process sees.

Inside each attention layer the local queries must see every earlier key of their
document, wherever it lives. :class:`ContextParallelGroup` provides the three pieces the
model uses:

* :meth:`~ContextParallelGroup.gather_key_value`: K and V (after the k-norm and RoPE; with
  grouped-query attention they are the small side of attention) all-gathered over the CP
  group by one collective whose backward reduce-scatters their gradients (a custom op,
  so that a compiled layer keeps it as one node and the selective checkpoint policy can
  save its output instead of repeating the collective in recompute);
* :meth:`~ContextParallelGroup.attention_mask`: the mask of the local queries over all
  gathered keys, causal by *global* index and same-document, from the CP group's
  ``position_ids`` (one small all-gather per stage forward, outside the compiled layers);
* :meth:`~ContextParallelGroup.sum_over_ranks`: a differentiable sum over the CP group,
  for the masked means of hidden-state snapshots.

Every collective runs on the same group in the same order on all its ranks: the ranks of
one CP group run the same stage on the same rows.
"""

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask

from d9d.module.block.document_mask import (
    AttentionBackend,
    build_sharded_document_mask,
    check_flex_backward,
    document_ids_from_position_ids,
    resolve_attention_backend,
)

# ---------------------------------------------------------------------------------------
# Which tokens a CP rank holds


def check_context_parallel_seq_len(
    seq_len: int, cp_size: int, name: str = "sequence length"
) -> None:
    """Raises ``ValueError`` unless ``seq_len`` splits into ``2 * cp_size`` equal chunks.

    Args:
        seq_len: The global sequence length (tokens of one row before sharding).
        cp_size: The context-parallel degree.
        name: Names the length in the message (e.g. ``"data.seq_len"``).
    """
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"{name} {seq_len} is not divisible by 2 x context-parallel degree = "
            f"{2 * cp_size} (each row is cut into {2 * cp_size} equal chunks, two per CP rank)"
        )


def head_tail_indices(
    seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The global token indices CP rank ``cp_rank`` holds, in its local order.

    The row is cut into ``2 * cp_size`` chunks; the rank holds chunk ``cp_rank`` followed
    by chunk ``2 * cp_size - 1 - cp_rank``. E.g. ``seq_len=8, cp_size=2``: rank 0 holds
    ``[0, 1, 6, 7]``, rank 1 ``[2, 3, 4, 5]``.

    Args:
        seq_len: The global sequence length (divisible by ``2 * cp_size``).
        cp_size: The context-parallel degree.
        cp_rank: The rank in the CP group, ``0 <= cp_rank < cp_size``.
        device: Where the indices are made.

    Returns:
        ``(seq_len // cp_size,)`` int64.

    Raises:
        ValueError: If the length does not split, or the rank is out of range.
    """
    check_context_parallel_seq_len(seq_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_size - 1 - cp_rank) * chunk
    tail = torch.arange(tail_start, tail_start + chunk, device=device)
    return torch.cat([head, tail])


def gathered_indices(
    seq_len: int, cp_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The global token index of every slot of a CP all-gather (rank 0's tokens first).

    Returns:
        ``(seq_len,)`` int64: ``cat([head_tail_indices(seq_len, cp_size, r) for r ...])``.
    """
    return torch.cat([head_tail_indices(seq_len, cp_size, r, device) for r in range(cp_size)])


def shard_batch_for_context_parallel(
    batch: Mapping[str, torch.Tensor], cp_rank: int, cp_size: int
) -> dict[str, torch.Tensor]:
    """The part of ``batch`` that CP rank ``cp_rank`` trains on (head-tail balanced).

    Every tensor shaped ``(batch, seq, ...)`` like ``input_ids`` (``labels``,
    ``position_ids``, ``hidden_states_agg_mask``, ...) keeps the rank's ``seq / cp_size``
    tokens of every row (see :func:`head_tail_indices`); per-row tensors ``(batch,)``
    pass unchanged. ``position_ids`` become ``arange(seq)`` first when the batch has
    none, so that the shards keep their global positions. With ``cp_size == 1`` the
    batch is returned as it is.

    Call it with the same batch on every rank of a CP group (they read the same rows);
    it runs no communication, so a bad batch fails on every rank alike.

    Args:
        batch: One data-parallel rank's batch, holding ``input_ids`` ``(batch, seq)``.
        cp_rank: This rank's index in its CP group (``DistributedContext.cp_rank``).
        cp_size: The CP degree (``DistributedContext.cp_size``).

    Returns:
        A new dict with the same keys (plus ``position_ids``).

    Raises:
        ValueError: If ``input_ids`` is missing or not 2-D, ``seq`` is not divisible by
            ``2 * cp_size``, or a tensor is neither ``(batch, seq, ...)`` nor ``(batch,)``.
    """
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise ValueError(f"context-parallel sharding needs input_ids (batch, seq), got {got}")
    rows, seq = input_ids.shape
    check_context_parallel_seq_len(seq, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if cp_size == 1:
        return dict(batch)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"batch[{key!r}] is not a tensor ({type(value).__name__})")
        if tuple(value.shape[:2]) != (rows, seq) and tuple(value.shape) != (rows,):
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(value.shape)}: context-parallel sharding "
                f"takes (batch, seq, ...) = ({rows}, {seq}, ...) tensors or per-row (batch,) "
                "ones"
            )
    full = dict(batch)
    if full.get("position_ids") is None:
        full["position_ids"] = torch.arange(seq, device=input_ids.device).expand(rows, seq)
    index = head_tail_indices(seq, cp_size, cp_rank, input_ids.device)
    return {
        key: value.index_select(1, index) if value.dim() >= 2 else value
        for key, value in full.items()
    }


# ---------------------------------------------------------------------------------------
# The K/V collective (a custom op: one node in a compiled graph, visible to SAC policies)

# The process groups the op may name (custom ops take strings, not group objects).
_GROUPS: dict[str, dist.ProcessGroup] = {}


def _all_gather_into(output: torch.Tensor, local: torch.Tensor, group: dist.ProcessGroup) -> None:
    if local.device.type != "cpu" and dist.get_backend(group) == "gloo":
        # A gloo group (e.g. several ranks sharing one GPU, where NCCL refuses) moves
        # accelerator tensors through host memory.
        staged = output.cpu()
        dist.all_gather_into_tensor(staged, local.cpu(), group=group)
        output.copy_(staged)
        return
    dist.all_gather_into_tensor(output, local, group=group)


def _reduce_scatter_into(
    output: torch.Tensor, full: torch.Tensor, group: dist.ProcessGroup
) -> None:
    if full.device.type != "cpu" and dist.get_backend(group) == "gloo":
        staged = output.cpu()
        dist.reduce_scatter_tensor(staged, full.cpu(), group=group)
        output.copy_(staged)
        return
    dist.reduce_scatter_tensor(output, full, group=group)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    if tensor.device.type != "cpu" and dist.get_backend(group) == "gloo":
        staged = tensor.cpu()
        dist.all_reduce(staged, group=group)
        tensor.copy_(staged)
        return
    dist.all_reduce(tensor, group=group)


@torch.library.custom_op("d9d::context_parallel_all_gather_kv", mutates_args=())
def _all_gather_kv(
    key: torch.Tensor, value: torch.Tensor, group_name: str, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # One collective for both: (2, B, H, S, D) from every rank, stacked on dim 0.
    local = torch.stack([key, value])
    gathered = local.new_empty((group_size * 2, *local.shape[1:]))
    _all_gather_into(gathered, local, _GROUPS[group_name])
    batch, heads, seq, dim = key.shape
    pieces = gathered.view(group_size, 2, batch, heads, seq, dim)
    outputs = []
    for which in (0, 1):
        # (C, B, H, S, D) -> (B, H, C * S, D), one copy: rank r's tokens at [r * S, (r + 1) * S).
        full = key.new_empty((batch, heads, group_size * seq, dim))
        full.view(batch, heads, group_size, seq, dim).copy_(pieces[:, which].permute(1, 2, 0, 3, 4))
        outputs.append(full)
    return outputs[0], outputs[1]


@_all_gather_kv.register_fake
def _(key, value, group_name, group_size):
    batch, heads, seq, dim = key.shape
    shape = (batch, heads, group_size * seq, dim)
    return key.new_empty(shape), value.new_empty(shape)


@torch.library.custom_op("d9d::context_parallel_reduce_scatter_kv", mutates_args=())
def _reduce_scatter_kv(
    grad_key: torch.Tensor, grad_value: torch.Tensor, group_name: str, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, full_seq, dim = grad_key.shape
    seq = full_seq // group_size
    # (B, H, C * S, D) -> (C, 2, B, H, S, D), one copy: the piece for rank r first on dim 0.
    pieces = grad_key.new_empty((group_size, 2, batch, heads, seq, dim))
    for which, grad in enumerate((grad_key, grad_value)):
        pieces[:, which].copy_(grad.view(batch, heads, group_size, seq, dim).permute(2, 0, 1, 3, 4))
    local = pieces.new_empty(pieces.shape[1:])
    _reduce_scatter_into(local, pieces.view(group_size * 2, *pieces.shape[2:]), _GROUPS[group_name])
    return local[0].clone(), local[1].clone()


@_reduce_scatter_kv.register_fake
def _(grad_key, grad_value, group_name, group_size):
    batch, heads, full_seq, dim = grad_key.shape
    shape = (batch, heads, full_seq // group_size, dim)
    return grad_key.new_empty(shape), grad_value.new_empty(shape)


def _all_gather_kv_backward(ctx, grad_key, grad_value):
    # Every rank's queries read this rank's keys: their gradients are summed back here.
    grad_key, grad_value = _reduce_scatter_kv(
        grad_key.contiguous(), grad_value.contiguous(), ctx.group_name, ctx.group_size
    )  # contiguous: the op views them as (B, H, C, S, D)
    return grad_key, grad_value, None, None


def _all_gather_kv_setup(ctx, inputs, output):
    ctx.group_name, ctx.group_size = inputs[2], inputs[3]


_all_gather_kv.register_autograd(_all_gather_kv_backward, setup_context=_all_gather_kv_setup)

KV_ALL_GATHER_OP = torch.ops.d9d.context_parallel_all_gather_kv.default
"""The op of the K/V all-gather: checkpoint policies save its outputs (never recompute it)."""


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradients (eager only)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone(memory_format=torch.contiguous_format)
        _all_reduce(summed, group)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.clone(memory_format=torch.contiguous_format)
        _all_reduce(summed, ctx.group)
        return summed, None


# ---------------------------------------------------------------------------------------
# The CP group as the model sees it


class ContextParallelGroup:
    """One rank's view of its context-parallel group, shared by every layer of a model.

    Built by ``d9d.module.parallelism.model.qwen3_dense_context_parallel``; the model
    asks it for its local positions and attention mask once per stage forward, and
    each attention layer asks it to gather K and V.

    Args:
        group: The CP process group (``DistributedContext.cp_group``).
        rank: This rank's index in ``group``.
        size: The CP degree (size of ``group``).
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int):
        self.group = group
        self.rank = rank
        self.size = size
        self._group_name = group.group_name
        _GROUPS[self._group_name] = group

    def check_local_seq_len(self, local_seq: int) -> None:
        """Raises ``ValueError`` unless a local length comes from a valid global one.

        Runs before any collective of the forward, on every rank alike.
        """
        global_seq = local_seq * self.size
        if global_seq % (2 * self.size):
            raise ValueError(
                f"local sequence length {local_seq} x context-parallel degree {self.size} = "
                f"{global_seq} is not divisible by 2 x context-parallel degree = "
                f"{2 * self.size}; shard batches with shard_batch_for_context_parallel"
            )

    def local_position_ids(
        self, position_ids: torch.Tensor | None, batch: int, local_seq: int, device
    ) -> torch.Tensor:
        """The global positions of this rank's tokens (from the layout when ``None``)."""
        if position_ids is not None:
            return position_ids
        index = head_tail_indices(local_seq * self.size, self.size, self.rank, device)
        return index.unsqueeze(0).expand(batch, local_seq)

    def gather_key_value(
        self, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gathers ``(B, H_kv, S_local, D)`` K and V into ``(B, H_kv, C * S_local, D)``.

        Slots ``[r * S_local, (r + 1) * S_local)`` hold rank ``r``'s tokens (see
        :func:`gathered_indices`). The backward reduce-scatters the gradients.
        """
        return _all_gather_kv(key.contiguous(), value.contiguous(), self._group_name, self.size)

    def attention_mask(
        self,
        position_ids: torch.Tensor | None,
        batch: int,
        local_seq: int,
        device: torch.device,
        backend: AttentionBackend | str,
    ) -> torch.Tensor | BlockMask:
        """The mask of this rank's queries over the gathered keys (True/visible = attend).

        Causal by global token index, and same document, the documents being found from
        the whole row's positions (gathered over the group; ``None`` means one document
        per row and needs no communication).

        Args:
            position_ids: This rank's ``(batch, local_seq)`` positions, or ``None``.
            batch: Rows.
            local_seq: Tokens per row on this rank.
            device: Where the mask is made.
            backend: ``sdpa`` (boolean ``(batch, 1, local_seq, C * local_seq)``) or
                ``flex`` (a ``BlockMask``); ``auto`` picks by device.
        """
        backend = resolve_attention_backend(backend, device)
        if backend is AttentionBackend.flex:
            check_flex_backward(device)  # before the collective, on every rank alike
        seq = local_seq * self.size
        q_index = head_tail_indices(seq, self.size, self.rank, device)
        kv_index = gathered_indices(seq, self.size, device)
        if position_ids is None:
            q_docs = torch.zeros(1, local_seq, dtype=torch.int32, device=device)
            kv_docs = torch.zeros(1, seq, dtype=torch.int32, device=device)
        else:
            gathered = self._all_gather_rows(position_ids.contiguous())
            # Back into row order, where the document rule applies.
            row_positions = torch.empty_like(gathered)
            row_positions[:, kv_index] = gathered
            docs = document_ids_from_position_ids(row_positions)
            q_docs, kv_docs = docs[:, q_index], docs[:, kv_index]
        return build_sharded_document_mask(q_index, kv_index, q_docs, kv_docs, backend)

    def _all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        # (B, S_local) from every rank -> (B, C * S_local), rank 0's tokens first.
        gathered = local.new_empty((self.size * local.shape[0], local.shape[1]))
        _all_gather_into(gathered, local, self.group)
        gathered = gathered.view(self.size, *local.shape).permute(1, 0, 2)
        return gathered.reshape(local.shape[0], -1)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the CP group, differentiable (backward: the same sum).

        Each rank's loss is one term of the global loss, so the gradient of a rank's
        contribution is the sum of what every rank's loss sends back.
        """
        return _SumOverGroup.apply(tensor, self.group)
