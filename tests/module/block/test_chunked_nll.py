"""The chunked LM-head loss: same numbers as the one-shot path, bounded logits memory."""

import pytest
import torch

from d9d.module.block.chunked_nll import EAGER_NLL_KERNELS, compiled_nll_kernels
from d9d.module.block.head import SplitLanguageModellingHead

SIZES = {"alpha": 24, "zeta": 40}
ORDER = ["zeta", "alpha"]


def _run(head, h, labels, grad_out):
    h = h.detach().clone().requires_grad_(True)
    nll = head(h, labels)
    (nll * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad(set_to_none=True)
    return nll.detach(), h.grad, grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_kernels", "compiled_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_path_equals_one_shot_path(dtype, compiled):
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=16).to(dtype)
    h = torch.randn(3, 7, 16, dtype=dtype)
    labels = torch.randint(0, 64, (3, 7))
    labels[0, :3] = -100
    labels[2, -1] = -100
    # A non-uniform upstream gradient: the loss reduction is the caller's choice.
    grad_out = torch.rand(3, 7)

    one_shot = _run(head, h, labels, grad_out)
    if compiled:
        # The fused kernels the compile layer installs must give the eager numbers.
        head.nll_kernels = compiled_nll_kernels("inductor")
    else:
        assert head.nll_kernels is EAGER_NLL_KERNELS
    # 5 tokens per chunk: 21 tokens -> 5 chunks
    head.logits_chunk_bytes = h.element_size() * 64 * 5
    chunked = _run(head, h, labels, grad_out)

    nll, nll_ref = chunked[0], one_shot[0]
    assert nll.dtype == torch.float32
    assert torch.equal(nll[labels == -100], torch.zeros(4))
    # fp32: only summation order differs. bf16: the one-shot path rounds the whole weight
    # gradient once; the chunked path accumulates chunk products in fp32 and rounds once,
    # so both are within bf16 resolution (2**-8 relative) of each other.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(nll, nll_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], one_shot[1], **tol)
    for name, grad in one_shot[2].items():
        torch.testing.assert_close(chunked[2][name], grad, **tol, msg=name)


def test_chunked_path_keeps_logits_memory_bounded():
    """Bytes saved for backward stay far below one (tokens, V) fp32 logits tensor."""
    vocab, tokens = 4096, 512
    head = SplitLanguageModellingHead({"v": vocab}, ["v"], hidden_size=32)
    h = torch.randn(1, tokens, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head(h, labels).sum()
        return total

    full_logits = tokens * vocab * 4
    one_shot = saved_bytes()
    head.logits_chunk_bytes = 64 * vocab * 4
    chunked = saved_bytes()
    assert one_shot >= full_logits
    # hidden + labels + weight + per-token logsumexp; no logits.
    assert chunked < full_logits / 4, (chunked, full_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gradient_kernel_equals_the_eager_one(dtype):
    # softmax - onehot, scaled: the compiled kernel overwrites the label column instead of
    # comparing every column with the label; ignored rows (-100) and rows whose label
    # another tensor-parallel rank holds (-1, no one-hot) included.
    torch.manual_seed(0)
    tokens, vocab = 37, 300
    logits = (torch.randn(tokens, vocab) * 4).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))
    labels[[1, 5]] = -100
    labels[[2, 9]] = -1
    labels[3] = 0
    labels[4] = vocab - 1
    lse = torch.logsumexp(logits.float(), dim=-1)
    grad_nll = torch.rand(tokens)
    args = (logits, lse, labels, grad_nll, -100)
    eager = EAGER_NLL_KERNELS.grad_logits(*args)
    compiled = compiled_nll_kernels("inductor").grad_logits(*args)
    assert compiled.dtype == dtype
    # Both are exp(logit - lse) (- 1 at the label) times the scale, rounded once; the
    # two exp implementations may differ in the last fp32 bit.
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-6}
    torch.testing.assert_close(compiled, eager, **tol)
    assert torch.all(compiled[[1, 5]] == 0)
    # The one-hot moved the label column below zero, and only there.
    for row in (0, 3, 4):
        assert compiled[row, labels[row]] < 0
        assert (compiled[row] < 0).sum() == 1
    assert torch.all(compiled[[2, 9]] > 0)
