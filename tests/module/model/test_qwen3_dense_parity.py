"""Numerical parity with HF ``transformers`` Qwen3 built from the same random weights.

HF is the oracle: its model is randomised (every RMSNorm weight included), its state dict is
mapped with ``state_dict_from_hf`` and loaded strictly into d9d. Per-token outputs and every
parameter gradient are compared, matched by name through ``state_dict_to_hf``.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

from d9d.dataset import token_pooling_mask_from_attention_mask
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseForClassification
from d9d.module.model.qwen3_dense.hf import state_dict_from_hf, state_dict_to_hf
from tests.helpers import (
    build,
    hf_config,
    random_ids,
    randomize_,
    rel_err,
    small_causal_lm_params,
    small_classification_params,
)

# Three splits whose order is neither alphabetical nor the dict's insertion order.
THREE_SPLITS = {
    "split_vocab_size": {"alpha": 37, "mid": 11, "zeta": 48},
    "split_vocab_order": ["zeta", "alpha", "mid"],
}


def to_bf16(hf_model: torch.nn.Module) -> torch.nn.Module:
    """Casts an HF model to bf16 the way ``from_pretrained(dtype=bf16)`` leaves it.

    ``Module.to`` also rounds the RoPE ``inv_freq`` buffer to bf16, which
    ``from_pretrained`` does not do (it computes the buffer in fp32), so restore it.
    """
    hf_model.to(torch.bfloat16)
    rotary = hf_model.model.rotary_emb
    rotary.inv_freq = rotary.compute_default_rope_parameters(hf_model.config)[0]
    return hf_model


def causal_lm_batch(vocab_size: int, batch: int = 3, seq: int = 24):
    """Unshifted ``input_ids`` and ``labels`` with ignored (-100) prompt and padding spans."""
    input_ids = random_ids(vocab_size, batch, seq + 1)
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, -4:] = -100
    return input_ids, labels


def run_causal_lm_pair(params, attn_implementation: str, dtype: torch.dtype):
    """Runs HF and d9d on the same weights and batch; returns outputs and grads by HF name."""
    hf = randomize_(Qwen3ForCausalLM(hf_config(params.model, attn_implementation)))
    if dtype == torch.bfloat16:
        to_bf16(hf)
    ours = build(Qwen3DenseForCausalLM, params)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), params.model), strict=True)
    ours.to(dtype)

    input_ids, labels = causal_lm_batch(params.model.vocab_size)
    hf_out = hf(input_ids=input_ids, labels=labels)
    hf_out.loss.backward()
    # HF shifts inside; its per-token NLL is the cross-entropy of the shifted pairs.
    hf_nll = F.cross_entropy(
        hf_out.logits[:, :-1].float().transpose(1, 2),
        labels[:, 1:],
        ignore_index=-100,
        reduction="none",
    )

    # d9d does not shift: the caller passes input_ids[:, :-1] with labels[:, 1:].
    logps = ours(input_ids=input_ids[:, :-1], labels=labels[:, 1:])["logps"]
    valid = labels[:, 1:] != -100
    loss = logps[valid].mean()
    loss.backward()

    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    our_grads = state_dict_to_hf(
        {name: p.grad for name, p in ours.named_parameters()}, params.model
    )
    return {
        "hf_loss": hf_out.loss.detach(),
        "loss": loss.detach(),
        "hf_nll": hf_nll.detach(),
        "logps": logps.detach(),
        "valid": valid,
        "hf_grads": hf_grads,
        "grads": our_grads,
    }


def report(res, worst_grad: float) -> None:
    """Prints the measured errors (shown by ``pytest -rP``)."""
    token = (res["logps"] - res["hf_nll"]).abs().max().item()
    loss = (res["loss"] - res["hf_loss"]).abs().item()
    print(f"per-token NLL abs err {token:.2e}, loss abs err {loss:.2e}, ", end="")
    print(f"worst gradient rel err {worst_grad:.2e}")


def assert_grads_close(res, max_rel_err: float) -> float:
    hf_grads, grads = res["hf_grads"], res["grads"]
    assert set(grads) == set(hf_grads)
    worst = 0.0
    for name, expected in hf_grads.items():
        assert expected is not None and grads[name] is not None, name
        assert grads[name].shape == expected.shape, name
        err = rel_err(grads[name], expected)
        assert err < max_rel_err, f"{name}: gradient relative error {err:.3e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize(
    ("attn_implementation", "vocab"),
    [("eager", {}), ("sdpa", {}), ("eager", THREE_SPLITS)],
    ids=["eager-2splits", "sdpa-2splits", "eager-3splits"],
)
def test_causal_lm_fp32_matches_hf_per_token_and_every_gradient(attn_implementation, vocab):
    params = small_causal_lm_params(num_hidden_layers=2, **vocab)
    res = run_causal_lm_pair(params, attn_implementation, torch.float32)

    logps, valid = res["logps"], res["valid"]
    assert logps.dtype == torch.float32
    assert logps.shape == valid.shape
    assert torch.all(logps[~valid] == 0.0)
    # Per token, not only the mean: a random model's loss is ~ln(V) whatever it computes.
    torch.testing.assert_close(logps, res["hf_nll"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["loss"], res["hf_loss"], rtol=1e-6, atol=1e-6)
    # Measured worst relative error ~1e-6 (fp32 rounding of different op orders).
    report(res, assert_grads_close(res, max_rel_err=1e-5))


def test_causal_lm_bf16_matches_hf_loosely():
    params = small_causal_lm_params(num_hidden_layers=2)
    # HF's eager attention (bf16 q k^T, then softmax rounded back to bf16) rounds in other
    # places than our scaled_dot_product_attention, which makes it the stricter oracle.
    res = run_causal_lm_pair(params, "eager", torch.bfloat16)
    # Both models keep bf16 activations (8 significant bits, ~3 decimal digits), so every
    # matmul, norm and residual add rounds at a relative 2**-9 = 2e-3, and the two
    # implementations round in different places. Measured over three seeds: per-token NLL
    # (values ~5) differs by up to 2.3e-2 absolute, the loss by up to 1.7e-3 and the worst
    # gradient by up to 2.1e-2 relative. The tolerances are ~2.5-3x those.
    assert res["logps"].dtype == torch.float32
    torch.testing.assert_close(res["logps"], res["hf_nll"], rtol=0.0, atol=6e-2)
    torch.testing.assert_close(res["loss"], res["hf_loss"], rtol=0.0, atol=5e-3)
    report(res, assert_grads_close(res, max_rel_err=5e-2))


def test_logps_mean_over_valid_tokens_is_hf_loss_and_ignored_tokens_are_zero():
    params = small_causal_lm_params(num_hidden_layers=1)
    res = run_causal_lm_pair(params, "eager", torch.float32)
    logps, valid = res["logps"], res["valid"]
    assert logps.shape == (3, 24)
    # Exactly zero (not just small) where the label is -100, and positive elsewhere.
    assert torch.equal(logps[~valid], torch.zeros_like(logps[~valid]))
    assert bool((logps[valid] > 0).all())
    torch.testing.assert_close(logps[valid].mean(), res["hf_loss"], rtol=1e-6, atol=1e-6)
    # A positive NLL, not a log-probability: it is ~ln(V) for a random model.
    assert abs(logps[valid].mean().item() - torch.log(torch.tensor(96.0)).item()) < 3.0


def run_classification_pair(attn_implementation: str):
    params = small_classification_params(num_labels=3, num_hidden_layers=2)
    vocab_size = params.model.vocab_size
    pad_id = vocab_size - 1  # never used as a real token below
    hf = randomize_(
        Qwen3ForSequenceClassification(
            hf_config(params.model, attn_implementation, num_labels=3, pad_token_id=pad_id)
        )
    )
    ours = build(Qwen3DenseForClassification, params)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), params.model), strict=True)

    lengths = torch.tensor([16, 5, 11, 1])
    seq = 16
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(0, vocab_size - 1, (4, seq)).masked_fill(attention_mask == 0, pad_id)

    hf_scores = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    pooling_mask = token_pooling_mask_from_attention_mask(attention_mask, "last")
    scores = ours(input_ids=input_ids, pooling_mask=pooling_mask)["scores"]

    weights = torch.randn(4, 3)
    (hf_scores * weights).sum().backward()
    (scores * weights).sum().backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    grads = state_dict_to_hf({name: p.grad for name, p in ours.named_parameters()}, params.model)
    return scores, hf_scores, grads, hf_grads


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_classification_last_token_scores_and_gradients_match_hf(attn_implementation):
    scores, hf_scores, grads, hf_grads = run_classification_pair(attn_implementation)
    assert scores.dtype == torch.float32
    assert scores.shape == (4, 3)
    torch.testing.assert_close(scores, hf_scores, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(hf_grads)
    for name, expected in hf_grads.items():
        # Rows of the embedding that no token uses have an all-zero gradient in both.
        err = rel_err(grads[name], expected) if expected.norm() > 0 else grads[name].norm()
        assert err < 2e-5, f"{name}: gradient relative error {err:.3e}"
