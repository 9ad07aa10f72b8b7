"""Per-token negative log-likelihood of a (split) linear head, memory-bounded.

The naive ``logits.float() -> logsumexp - gather`` path keeps fp32 logits for the whole
``(B, S, V)`` alive until backward (2.5 GB per 4096-token sequence at V=151936) and walks
them several times in eager mode. Here:

* the logits stay in the matmul dtype; the fp32 math (``logsumexp``, the pick, and in
  backward ``softmax - onehot``) happens inside two small kernels
  (:class:`NLLKernels`), which the compile layer swaps for fused ``torch.compile``d
  versions so fp32 logits are never materialised (the eager kernels make transient
  fp32 copies of one chunk);
* when the logits of the whole batch fit in the caller's budget they are kept for
  backward (three head matmuls, like the naive path); otherwise the tokens are processed
  in chunks that fit, only the per-token ``logsumexp`` is kept, and backward recomputes
  each chunk's logits (one extra head matmul) — the head's extra memory is then bounded
  by one chunk.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _lse_and_nll(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    ignored = labels == ignore_index
    picked = x.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return lse, (lse - picked).masked_fill(ignored, 0.0)


def _grad_logits_label_scatter(
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    grad_nll: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    # d nll / d logits = softmax(logits) - onehot(label), scaled by the incoming grad.
    # One pointwise pass writes softmax * scale; the label column is then overwritten
    # with (softmax - 1) * scale, computed in fp32 from the gathered logit, so it rounds
    # to the logits' dtype once, as a one-hot expression would. Comparing every column
    # with the label inside the pass (an int64 compare per element) made the compiled
    # CPU kernel twice as slow (12.5 vs 6.1 ms for 768 x 32,000 bf16 logits).
    scale = grad_nll.float().masked_fill(labels == ignore_index, 0.0).unsqueeze(-1)
    lse = lse.unsqueeze(-1)
    grad = ((logits.float() - lse).exp() * scale).to(logits.dtype)
    # A negative label (ignore_index, or a label another tensor-parallel rank's
    # vocabulary holds) subtracts no one-hot; its row's column 0 is rewritten unchanged.
    index = labels.clamp(min=0).unsqueeze(-1)
    picked = (logits.gather(-1, index).float() - lse).exp()
    picked = torch.where(labels.unsqueeze(-1) >= 0, picked - 1.0, picked) * scale
    return grad.scatter(-1, index, picked.to(logits.dtype))


def _grad_logits_inplace(
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    grad_nll: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    # Same math for eager mode: in-place on one fp32 buffer instead of a one-hot matrix.
    ignored = labels == ignore_index
    # One fp32 buffer for the whole computation (copy=True: fp32 logits are not touched).
    probs = logits.to(torch.float32, copy=True).sub_(lse.unsqueeze(-1)).exp_()
    # A negative label other than ignore_index (a label another tensor-parallel rank's
    # vocabulary holds) keeps its softmax row and subtracts no one-hot.
    minus_one = torch.where(labels >= 0, -1.0, 0.0).to(probs.dtype).unsqueeze(-1)
    probs.scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), minus_one)
    probs.mul_(grad_nll.float().masked_fill(ignored, 0.0).unsqueeze(-1))
    return probs.to(logits.dtype)


@dataclass(frozen=True)
class NLLKernels:
    """The two elementwise/reduction kernels of the head loss.

    Attributes:
        lse_and_nll: ``(logits (N, V), labels (N,), ignore_index) -> (lse, nll)``, fp32.
        grad_logits: ``(logits, lse, labels, grad_nll, ignore_index) -> grad`` in the
            logits' dtype.
    """

    lse_and_nll: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    grad_logits: Callable[..., torch.Tensor]


EAGER_NLL_KERNELS = NLLKernels(_lse_and_nll, _grad_logits_inplace)


def _vocab_parallel_lse_and_nll(
    logits: torch.Tensor, local_labels: torch.Tensor, ignore_index: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``logits`` hold this rank's slice of the vocabulary; ``local_labels`` index into it
    # (-1: another rank holds the label, ignore_index: ignored). The max, the sum of
    # exponentials and the picked logit are reduced over the group, so no rank ever
    # holds the logits of the whole vocabulary.
    x = logits.float()
    row_max = x.amax(dim=-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (x - row_max.unsqueeze(-1)).exp().sum(dim=-1)
    owned = local_labels >= 0
    picked = x.gather(-1, local_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    stats = torch.stack([sum_exp, picked.masked_fill(~owned, 0.0)])
    dist.all_reduce(stats, group=group)
    lse = row_max + stats[0].log()
    return lse, (lse - stats[1]).masked_fill(local_labels == ignore_index, 0.0)


@functools.cache
def compiled_nll_kernels(backend: str = "inductor") -> NLLKernels:
    """The kernels compiled once per process (dynamic shapes: any chunk length/vocab)."""
    compile_fn = functools.partial(torch.compile, backend=backend, dynamic=True, fullgraph=True)
    return NLLKernels(compile_fn(_lse_and_nll), compile_fn(_grad_logits_label_scatter))


def _logits(h: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    parts = [h @ w.t() for w in weights]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, ignore_index, chunk_tokens, kernels, group, *weights):
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        num_tokens = flat_h.shape[0]
        keep_logits = num_tokens <= chunk_tokens
        if group is None:
            lse_and_nll = kernels.lse_and_nll
        else:
            lse_and_nll = functools.partial(_vocab_parallel_lse_and_nll, group=group)
        if keep_logits:
            logits = _logits(flat_h, weights)
            lse, nll = lse_and_nll(logits, flat_labels, ignore_index)
            ctx.save_for_backward(hidden, labels, lse, logits, *weights)
        else:
            lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
            nll = torch.empty_like(lse)
            for start in range(0, num_tokens, chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                lse[rows], nll[rows] = lse_and_nll(
                    _logits(flat_h[rows], weights), flat_labels[rows], ignore_index
                )
            ctx.save_for_backward(hidden, labels, lse, None, *weights)
        ctx.ignore_index = ignore_index
        ctx.chunk_tokens = chunk_tokens
        ctx.kernels = kernels
        ctx.group = group
        # A fresh (B, S) tensor, not a view: FSDP2 warns about (and mishandles in-place
        # ops on) module outputs that are views. The copy is 4 bytes per token.
        return nll.view(labels.shape).clone()

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, labels, lse, logits, *weights = ctx.saved_tensors
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        flat_grad = grad_nll.reshape(-1)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[6:]
        sizes = [w.shape[0] for w in weights]
        num_tokens = flat_h.shape[0]
        chunk = num_tokens if logits is not None else ctx.chunk_tokens
        single = chunk >= num_tokens
        grad_h = torch.empty_like(flat_h) if need_h else None
        # Several chunks accumulate weight grads in fp32 so that bf16 rounds once, as in
        # one GEMM; a single chunk writes them directly.
        grad_w = [None] * len(weights)
        for start in range(0, num_tokens, chunk):
            rows = slice(start, start + chunk)
            h = flat_h[rows]
            chunk_logits = logits if logits is not None else _logits(h, weights)
            grad_logits = ctx.kernels.grad_logits(
                chunk_logits, lse[rows], flat_labels[rows], flat_grad[rows], ctx.ignore_index
            )
            del chunk_logits
            parts = torch.split(grad_logits, sizes, dim=-1)
            if need_h:
                grad_h[rows] = functools.reduce(
                    torch.add, (p @ w for p, w in zip(parts, weights, strict=True))
                )
            for i, part in enumerate(parts):
                if not need_w[i]:
                    continue
                product = part.t() @ h
                if single:
                    grad_w[i] = product
                elif grad_w[i] is None:
                    grad_w[i] = product.float()
                else:
                    grad_w[i] += product
        grads_w = [g if g is None else g.to(w.dtype) for g, w in zip(grad_w, weights, strict=True)]
        if need_h and ctx.group is not None:
            # Each rank's logits cover its slice of the vocabulary: the hidden gradient is
            # the sum of every slice's part.
            dist.all_reduce(grad_h, group=ctx.group)
        grad_hidden = grad_h.view(hidden.shape) if need_h else None
        return (grad_hidden, None, None, None, None, None, *grads_w)


def linear_nll(
    hidden: torch.Tensor,
    weights: list[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    chunk_tokens: int,
    kernels: NLLKernels = EAGER_NLL_KERNELS,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token NLL of ``hidden @ cat(weights).T`` against ``labels``.

    Args:
        hidden: ``(..., H)`` activations.
        weights: Head weights ``(V_i, H)`` of each vocab split, in global vocab order.
        labels: ``(...)`` target ids; ``ignore_index`` positions give exactly 0.
        ignore_index: Label value to ignore.
        chunk_tokens: Most tokens whose logits are alive at once. If all tokens fit, the
            logits are kept for backward; otherwise they are recomputed chunk by chunk.
        kernels: The loss kernels (eager, or :func:`compiled_nll_kernels`).
        group: Vocab-parallel mode (tensor parallelism): ``weights`` are this rank's
            rows of each split, ``labels`` index into their concatenation (``-1`` where
            another rank of ``group`` holds the label), ``hidden`` is the same on every
            rank. The max, logsumexp and label pick are reduced over ``group`` (chunk by
            chunk: the full-vocabulary logits never exist anywhere); the returned NLL
            and the hidden gradient are complete on every rank, weight gradients are
            this rank's rows.

    Returns:
        fp32 ``(...)`` tensor of ``logsumexp(logits) - logits[label]``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _LinearNLL.apply(hidden, labels, ignore_index, chunk_tokens, kernels, group, *weights)
