"""Packed rows (several documents per row) equal each document run alone.

A document starts wherever ``position_ids`` do not continue by +1. The reference runs
every document on its own (positions continuing from the chunk's first position), in
eager fp32 and in HF transformers; the packed batch must give the same per-token NLL and,
for the summed loss, the same gradient of every parameter.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Qwen3ForCausalLM

from d9d.compile import apply_compile_config, load_compile_config
from d9d.core.checks import inputs_prevalidated
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.model.qwen3_dense.hf import state_dict_to_hf
from tests.helpers import TINY, VOCAB, build, hf_config, randomize_, rel_err, small_causal_lm_params

SEQ = 24
# Rows of (length, first position, is_padding). Every row of a layout holds SEQ tokens.
LAYOUT_A = [
    [(SEQ, 0, False)],  # one document
    [(10, 0, False), (14, 0, False)],  # two
    # many: length-1 documents, a continuation chunk (starts at 40) right after a
    # document, then padding that restarts at 0 (its own "document", labels ignored)
    [(1, 0, False), (5, 0, False), (1, 0, False), (7, 40, False), (6, 0, False), (4, 0, True)],
]
LAYOUT_B = [
    [(3, 0, False), (21, 0, False)],
    [(SEQ, 5, False)],  # one continuation chunk filling a row
    [(8, 0, False), (8, 0, False), (8, 0, False)],
]
LAYOUT_C = [
    [(12, 0, False), (1, 0, False), (11, 0, False)],
    [(2, 0, False), (2, 0, False), (20, 0, True)],
    [(SEQ - 1, 0, False), (1, 0, False)],
]

# fp32 throughout: packed and per-document runs reduce in different orders (different
# sequence lengths and kernels), a few ulps, far below 1e-5 relative.
RTOL = 1e-5


def make_batch(layout, seed: int = 0):
    """Returns the packed batch and its real (non-padding) segments ``(row, start, len)``."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (len(layout), SEQ), generator=gen)
    labels = torch.full_like(input_ids, -100)
    position_ids = torch.zeros_like(input_ids)
    segments = []
    for row, parts in enumerate(layout):
        offset = 0
        for length, first, padding in parts:
            span = slice(offset, offset + length)
            position_ids[row, span] = torch.arange(first, first + length)
            if padding:
                position_ids[row, span] = torch.arange(length)
            else:
                # Each token predicts the next one of its own document; the last token of
                # a segment has no label (the next slot belongs to another segment).
                labels[row, offset : offset + length - 1] = torch.randint(
                    0, VOCAB, (length - 1,), generator=gen
                )
                segments.append((row, offset, length))
            offset += length
        assert offset == SEQ
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}, segments


def segment_inputs(batch, segment):
    row, start, length = segment
    return {key: value[row : row + 1, start : start + length] for key, value in batch.items()}


def params():
    return small_causal_lm_params(num_hidden_layers=2, **TINY)


def fresh_model():
    torch.manual_seed(7)
    return randomize_(build(Qwen3DenseForCausalLM, params()))


def packed_step(model, batch):
    model.zero_grad(set_to_none=True)
    logps = model(**batch)["logps"]
    logps.sum().backward()
    return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def per_document_reference(model, batch, segments):
    """Per-token NLL scattered back to packed positions, and the gradient summed over docs."""
    model.zero_grad(set_to_none=True)
    logps = torch.zeros(batch["input_ids"].shape)
    for segment in segments:
        row, start, length = segment
        out = model(**segment_inputs(batch, segment))["logps"]
        out.sum().backward()
        logps[row, start : start + length] = out[0].detach()
    return logps, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_matches(actual, expected, what):
    logps, grads = actual
    ref_logps, ref_grads = expected
    torch.testing.assert_close(logps, ref_logps, rtol=RTOL, atol=RTOL, msg=f"{what}: NLL")
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        err = rel_err(grads[name], ref)
        assert err < RTOL, f"{what}: {name}: gradient relative error {err:.2e}"


@pytest.fixture(scope="module")
def references():
    """Eager per-document references of the three layouts (weights of ``fresh_model``)."""
    model = fresh_model()
    out = {}
    for name, layout in (("A", LAYOUT_A), ("B", LAYOUT_B), ("C", LAYOUT_C)):
        batch, segments = make_batch(layout, seed=ord(name))
        out[name] = (batch, per_document_reference(model, batch, segments))
    return out


@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_eager_packed_equals_each_document_alone(references, layout):
    batch, reference = references[layout]
    assert_matches(packed_step(fresh_model(), batch), reference, f"eager layout {layout}")


def test_compile_sac_packed_equals_documents_without_breaks_or_recompiles(references):
    torch._dynamo.reset()
    counters.clear()
    model = fresh_model()
    apply_compile_config(model, load_compile_config("compile_sac"))
    batch, reference = references["A"]
    assert_matches(packed_step(model, batch), reference, "compile_sac layout A")
    graphs = counters["stats"]["unique_graphs"]
    # Two more document layouts of the same batch shape: new mask data, same graphs.
    for layout in ("B", "C"):
        batch, reference = references[layout]
        assert_matches(packed_step(model, batch), reference, f"compile_sac layout {layout}")
    assert counters["stats"]["unique_graphs"] == graphs, "a new document layout recompiled"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_packed_equals_hf_transformers_run_per_document():
    model = fresh_model()
    hf = Qwen3ForCausalLM(hf_config(params().model, "sdpa"))
    hf.load_state_dict(state_dict_to_hf(model.state_dict(), params().model), strict=True)
    batch, segments = make_batch(LAYOUT_A, seed=3)
    hf_logps = torch.zeros(batch["input_ids"].shape)
    for segment in segments:
        row, start, length = segment
        inputs = segment_inputs(batch, segment)
        logits = hf(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
        labels = inputs["labels"][0]
        valid = labels != -100
        nll = (
            torch.logsumexp(logits[0], -1)
            - logits[0].gather(-1, labels.clamp_min(0)[:, None])[:, 0]
        )
        nll = torch.where(valid, nll, 0.0)
        nll.sum().backward()
        hf_logps[row, start : start + length] = nll.detach()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    logps, grads = packed_step(model, batch)
    assert_matches((logps, state_dict_to_hf(grads, params().model)), (hf_logps, hf_grads), "HF")


def test_packing_is_detected_inside_a_prevalidated_step():
    # A training step validates its batch once and skips the per-forward value checks;
    # the document mask must still be built.
    model = fresh_model()
    batch, _ = make_batch(LAYOUT_B, seed=4)
    with torch.no_grad():
        expected = model(**batch)["logps"]
        with inputs_prevalidated():
            actual = model(**batch)["logps"]
            plain = model(input_ids=batch["input_ids"], labels=batch["labels"])["logps"]
    assert torch.equal(actual, expected)
    assert not torch.equal(plain, expected)


def test_changing_one_document_changes_no_output_of_another():
    model = fresh_model()
    batch, _ = make_batch(LAYOUT_A, seed=5)
    with torch.no_grad():
        before = model(**batch)["hidden_states"]
        changed = {key: value.clone() for key, value in batch.items()}
        changed["input_ids"][1, :10] = (changed["input_ids"][1, :10] + 1) % VOCAB
        after = model(**changed)["hidden_states"]
    assert not torch.equal(after[1, :10], before[1, :10])  # document 1 itself changed
    # Masked scores contribute an exact zero, so document 2 is bit-identical.
    assert torch.equal(after[1, 10:], before[1, 10:])
    assert torch.equal(after[[0, 2]], before[[0, 2]])


def test_consecutive_positions_take_the_plain_causal_path_bit_identically():
    model = fresh_model()
    batch, _ = make_batch(LAYOUT_A, seed=6)
    batch["position_ids"] = torch.arange(SEQ).expand(len(LAYOUT_A), SEQ)
    with torch.no_grad():
        explicit = model(**batch)["logps"]
        implicit = model(input_ids=batch["input_ids"], labels=batch["labels"])["logps"]
        _, mask = model.model._position_embeddings(
            batch["position_ids"], len(LAYOUT_A), SEQ, torch.zeros(())
        )
    assert mask is None
    assert torch.equal(explicit, implicit)


@pytest.mark.parametrize(
    ("position_ids", "match"),
    [
        (torch.zeros(2, 5, dtype=torch.long), r"position_ids shape \(2, 5\)"),
        (torch.zeros(2, 6), r"position_ids must be int64 or int32.*float32"),
        (torch.arange(-1, 5).expand(2, 6), r"position_ids must be non-negative.*-1"),
        (torch.arange(123, 129).expand(2, 6), r"position_ids must be < max_position_ids=128.*128"),
    ],
    ids=["shape", "dtype", "negative", "too-large"],
)
def test_bad_position_ids_raise_value_error(position_ids, match):
    model = fresh_model()
    with pytest.raises(ValueError, match=match):
        model(
            input_ids=torch.zeros(2, 6, dtype=torch.long),
            labels=torch.zeros(2, 6).long(),
            position_ids=position_ids,
        )


def test_flex_forward_on_cpu_matches_sdpa_without_recompiles():
    model = fresh_model()
    with torch.no_grad():
        results = []
        for layout, seed in ((LAYOUT_A, 0), (LAYOUT_B, 1), (LAYOUT_C, 2)):
            batch, _ = make_batch(layout, seed)
            model.set_attention_backend("sdpa")
            expected = model(**batch)["logps"]
            model.set_attention_backend("flex")
            results.append((model(**batch)["logps"], expected))
            if len(results) == 1:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new document layout recompiled flex"
    for actual, expected in results:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL)


def test_flex_backward_on_cpu_is_refused_clearly():
    model = fresh_model()
    model.set_attention_backend("flex")
    batch, _ = make_batch(LAYOUT_B)
    with pytest.raises(ValueError, match="'flex' has no backward on the CPU"):
        model(**batch)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        model.set_attention_backend("flash")
