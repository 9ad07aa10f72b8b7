"""Output heads: split LM head (per-token NLL) and the classification head."""

import pytest
import torch
import torch.nn.functional as F

from d9d.module.block.head import ClassificationHead, SplitLanguageModellingHead

SIZES = {"alpha": 3, "zeta": 5}
ORDER = ["zeta", "alpha"]


def test_logits_are_split_logits_concatenated_in_order():
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=6)
    h = torch.randn(2, 3, 6)
    logits = head.logits(h)
    assert logits.shape == (2, 3, 8)
    torch.testing.assert_close(logits[..., :5], h @ head.lm_head["zeta"].weight.T)
    torch.testing.assert_close(logits[..., 5:], h @ head.lm_head["alpha"].weight.T)
    assert all(lin.bias is None for lin in head.lm_head.values())


def test_nll_is_positive_cross_entropy_with_exact_zero_at_ignore_index():
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=6)
    h = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.tensor([[0, 7, -100, 5], [-100, -100, 4, 2]])
    nll = head(h, labels)
    assert nll.shape == (2, 4) and nll.dtype == torch.float32
    expected = F.cross_entropy(
        head.logits(h).transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    torch.testing.assert_close(nll, expected)
    ignored = labels == -100
    assert torch.equal(nll[ignored], torch.zeros(3))
    assert bool((nll[~ignored] > 0).all())
    # Ignored positions contribute no gradient.
    nll.sum().backward()
    assert torch.equal(h.grad[ignored], torch.zeros(3, 6))


def test_nll_is_fp32_for_bf16_inputs():
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=6).to(torch.bfloat16)
    h = torch.randn(1, 3, 6, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 6, -100]])
    nll = head(h, labels)
    assert nll.dtype == torch.float32
    logits = head.logits(h).float()
    expected = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="none")
    torch.testing.assert_close(nll[0], expected)


@pytest.mark.parametrize("bad", [8, -1, -99, 1000])
def test_labels_outside_vocab_raise_naming_the_value(bad):
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=6)
    with pytest.raises(ValueError, match=rf"labels.*(?<![\d-]){bad}(?!\d)"):
        head(torch.randn(1, 3, 6), torch.tensor([[0, bad, -100]]))


def test_labels_of_wrong_shape_raise():
    head = SplitLanguageModellingHead(SIZES, ORDER, hidden_size=6)
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(1, 3, 6), torch.tensor([[0, 1]]))


def test_classification_head_pools_rows_in_batch_seq_order():
    head = ClassificationHead(hidden_size=6, num_labels=3, dropout=0.0)
    assert head.score.bias is None
    h = torch.randn(2, 4, 6)
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]])
    scores = head(h, mask)
    assert scores.shape == (3, 3) and scores.dtype == torch.float32
    expected = torch.stack([h[0, 1], h[0, 3], h[1, 0]]) @ head.score.weight.T
    torch.testing.assert_close(scores, expected)
    assert head(h, None).shape == (2, 4, 3)


def test_classification_head_applies_dropout_only_in_training():
    head = ClassificationHead(hidden_size=64, num_labels=2, dropout=0.5)
    h = torch.randn(3, 64)[:, None, :]
    mask = torch.ones(3, 1)
    head.eval()
    torch.testing.assert_close(head(h, mask), h[:, 0] @ head.score.weight.T)
    head.train()
    assert not torch.allclose(head(h, mask), h[:, 0] @ head.score.weight.T)


def test_classification_head_scores_are_fp32_for_bf16():
    head = ClassificationHead(hidden_size=6, num_labels=3, dropout=0.0).to(torch.bfloat16)
    assert head(torch.randn(2, 4, 6, dtype=torch.bfloat16), None).dtype == torch.float32
