"""The FLOPs formula against PyTorch's own FLOP counter, and the Qwen3 preset shapes."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from d9d.metrics.flops import matmul_parameter_count, training_flops_per_token
from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.module.model.qwen3_dense.presets import get_model_preset
from d9d.pipelining.api import PipelineStageInfo
from tests.helpers import small_causal_lm_params

BATCH, SEQ = 2, 24


def _count_training_step(model: nn.Module, vocab: int) -> dict[str, int]:
    """FlopCounterMode over one forward + backward, per aten op."""
    input_ids = torch.randint(0, vocab, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as bmm's, which FlopCounterMode counts; the CPU
    # flash kernel is not in its formula table.
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(input_ids=input_ids, labels=input_ids)
        out["logps"].mean().backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.fixture
def model_and_params():
    # Unequal head counts (GQA), two vocab splits in non-alphabetical order, 3 layers.
    params = small_causal_lm_params(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    )
    model = Qwen3DenseForCausalLM(
        params, PipelineStageInfo(0, 1), HiddenStatesAggregationMode.no, enable_checkpointing=False
    )
    return model, params


def test_matmul_parameter_count_is_every_linear_weight(model_and_params):
    model, params = model_and_params
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    assert matmul_parameter_count(params) == linear_weights
    # Embeddings are excluded, the LM head (same size here) is included.
    assert embeddings == params.model.vocab_size * params.model.layer.hidden_size
    assert matmul_parameter_count(params) == matmul_parameter_count(params.model)


def test_formula_matches_flop_counter(model_and_params):
    """Compared exactly, for one forward + backward of B x S tokens:

    * ``aten.mm`` = every nn.Linear (layers + LM head), forward (2N per token) and backward
      (grad input + grad weight, 4N per token)  ==  ``6 * N * tokens``;
    * ``aten.bmm`` = the attention products Q K^T and P V of the math SDPA backend,
      forward and backward, over the full S x S scores (the math backend computes the
      whole matrix and masks it, so the causal mask does not change the count)
      ==  ``12 * L * H * head_dim * S * tokens``.
    Nothing else in the model is a matmul, so their sum is the whole formula.
    """
    model, params = model_and_params
    counts = _count_training_step(model, params.model.vocab_size)
    expected = training_flops_per_token(params, SEQ)
    tokens = BATCH * SEQ
    assert set(counts) == {"aten.mm", "aten.bmm"}
    assert counts["aten.mm"] == expected.matmul * tokens
    assert counts["aten.bmm"] == expected.attention * tokens
    assert sum(counts.values()) == expected.total * tokens


def test_attention_term_grows_with_sequence_and_matmul_term_does_not(model_and_params):
    _, params = model_and_params
    short, long = training_flops_per_token(params, 16), training_flops_per_token(params, 64)
    assert long.matmul == short.matmul
    assert long.attention == 4 * short.attention


def test_non_positive_seq_len_is_rejected(model_and_params):
    _, params = model_and_params
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(params, 0)


@pytest.mark.parametrize(
    ("name", "non_embedding_billions"),
    # Qwen3 model cards: "Number of Parameters (Non-Embedding)".
    [
        ("qwen3-0.6b", 0.44),
        ("qwen3-1.7b", 1.4),
        ("qwen3-4b", 3.6),
        ("qwen3-8b", 6.95),
        ("qwen3-14b", 13.2),
        ("qwen3-32b", 31.2),
    ],
)
def test_qwen3_presets_have_the_published_size(name, non_embedding_billions):
    params = get_model_preset(name).parameters()
    head = params.model.layer.hidden_size * params.model.vocab_size
    # The model cards count neither the embedding nor the LM head; the norms are < 0.1%.
    layers_only = matmul_parameter_count(params) - head
    assert layers_only / 1e9 == pytest.approx(non_embedding_billions, rel=0.01)
