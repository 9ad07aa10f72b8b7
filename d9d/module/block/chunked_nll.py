"""Per-token negative log-likelihood of a (split) linear head, computed in token chunks.

The plain ``logits -> logsumexp - gather`` path keeps fp32 logits for the whole
``(B, S, V)`` alive until backward; at V=151936, S=4096 that is 2.5 GB per sequence. Here
the forward keeps only the per-token ``logsumexp`` and the backward recomputes each
chunk's logits, so the head's extra memory is bounded by one chunk of ``(tokens, V)``
logits. The price is one more head matmul in backward (4 instead of 3).
"""

import torch


class _ChunkedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, ignore_index, chunk_size, *weights):
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        nll = torch.empty(flat_h.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(nll)
        for start in range(0, flat_h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(flat_h[rows], weights)
            chunk_labels = flat_labels[rows]
            ignored = chunk_labels == ignore_index
            picked = logits.gather(-1, chunk_labels.masked_fill(ignored, 0).unsqueeze(-1))
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[rows] = chunk_lse
            nll[rows] = (chunk_lse - picked.squeeze(-1)).masked_fill(ignored, 0.0)
        ctx.save_for_backward(hidden, labels, lse, *weights)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        return nll.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, labels, lse, *weights = ctx.saved_tensors
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        flat_grad = grad_nll.reshape(-1).float()
        need_h = ctx.needs_input_grad[0]
        need_w = [ctx.needs_input_grad[4 + i] for i in range(len(weights))]
        grad_h = torch.empty_like(flat_h) if need_h else None
        grad_w = [
            torch.zeros_like(w, dtype=torch.float32) if n else None
            for w, n in zip(weights, need_w, strict=True)
        ]
        sizes = [w.shape[0] for w in weights]
        for start in range(0, flat_h.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = flat_h[rows]
            chunk_labels = flat_labels[rows]
            ignored = chunk_labels == ctx.ignore_index
            # d nll / d logits = softmax - onehot(label), scaled per token by the incoming grad.
            probs = (_chunk_logits(h, weights) - lse[rows].unsqueeze(-1)).exp_()
            probs.scatter_add_(
                -1,
                chunk_labels.masked_fill(ignored, 0).unsqueeze(-1),
                torch.full((h.shape[0], 1), -1.0, device=h.device),
            )
            scale = flat_grad[rows].masked_fill(ignored, 0.0).unsqueeze(-1)
            grad_logits = (probs * scale).to(h.dtype)
            parts = torch.split(grad_logits, sizes, dim=-1)
            if need_h:
                grad_h[rows] = sum(p @ w for p, w in zip(parts, weights, strict=True))
            for i, p in enumerate(parts):
                if need_w[i]:
                    # Accumulate chunks in fp32 so bf16 rounding happens once, as in one GEMM.
                    grad_w[i] += p.t() @ h
        grad_hidden = grad_h.view(hidden.shape) if need_h else None
        grads_w = [
            g.to(w.dtype) if g is not None else None for g, w in zip(grad_w, weights, strict=True)
        ]
        return (grad_hidden, None, None, None, *grads_w)


def _chunk_logits(h: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    parts = [h @ w.t() for w in weights]
    logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return logits.float()


def chunked_linear_nll(
    hidden: torch.Tensor,
    weights: list[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
) -> torch.Tensor:
    """Per-token NLL of ``hidden @ cat(weights).T`` against ``labels``, chunked over tokens.

    Args:
        hidden: ``(..., H)`` activations.
        weights: Head weights ``(V_i, H)`` of each vocab split, in global vocab order.
        labels: ``(...)`` target ids; ``ignore_index`` positions give exactly 0.
        ignore_index: Label value to ignore.
        chunk_size: Tokens per chunk; bounds the fp32 logits kept at once to
            ``chunk_size * V``.

    Returns:
        fp32 ``(...)`` tensor of ``logsumexp(logits) - logits[label]``.
    """
    return _ChunkedLinearNLL.apply(hidden, labels, ignore_index, chunk_size, *weights)
