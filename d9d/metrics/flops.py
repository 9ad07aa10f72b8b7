"""Model FLOPs per token for training a Qwen3 Dense causal LM.

Convention (the one MFU is quoted in by PaLM, Megatron-LM and torchtitan)::

    flops_per_token = 6 * N + 12 * L * H * head_dim * S

* ``N`` is the number of **matmul** weights: q/k/v/o and gate/up/down of every layer plus
  the language-model head. Embeddings are excluded (a lookup, not a matmul); so are the
  RMSNorm weights. The head counts even for checkpoints that tie it to the embedding in
  HF, because it is a real ``hidden x vocab`` matmul on every token.
* ``6 * N``: a linear costs ``2 * N`` FLOPs per token forward (one multiply-add per
  weight) and ``4 * N`` backward (gradient w.r.t. the input and w.r.t. the weight).
* ``12 * L * H * head_dim * S``: attention scores ``Q K^T`` and ``P V`` each cost
  ``2 * S * head_dim`` FLOPs per token and query head forward, backward twice that. The
  count is for the **full** ``S x S`` score matrix even though the model is causal: a
  causal kernel skips about half of it. This is the usual convention, so a MFU quoted here
  compares with published numbers, but attention-heavy shapes (long ``S``) overstate the
  work really done by up to the attention share of the total.

Activation recomputation (activation checkpointing) is *not* counted: MFU measures the
model's useful work, so recompute lowers MFU instead of inflating it. ``S`` is the
sequence length of the batch actually run (``input_ids.shape[1]``), not the model's
``max_position_ids``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseParameters,
)


@dataclass(frozen=True)
class TrainingFlopsPerToken:
    """Training FLOPs per token, split into its two terms.

    Attributes:
        matmul: ``6 * N``: forward + backward of every matmul weight.
        attention: ``12 * L * H * head_dim * S``: forward + backward of the attention
            score and value products (full ``S x S``, see the module docstring).
    """

    matmul: int
    attention: int

    @property
    def total(self) -> int:
        """Both terms: the model FLOPs of one trained token."""
        return self.matmul + self.attention


def _backbone(params: Qwen3DenseForCausalLMParameters | Qwen3DenseParameters):
    return params.model if isinstance(params, Qwen3DenseForCausalLMParameters) else params


def matmul_parameter_count(params: Qwen3DenseForCausalLMParameters | Qwen3DenseParameters) -> int:
    """Counts the matmul weights ``N`` of the whole causal LM (layers and LM head).

    Computed from the shapes, so it is the same for a model on ``meta``, one whose
    linears were swapped for float8 ones, or one sharded by FSDP.

    Args:
        params: Causal-LM parameters or the backbone parameters (the head is counted
            either way: it has ``hidden_size x vocab_size`` weights).

    Returns:
        The number of weights that take part in a matmul on every token.
    """
    model = _backbone(params)
    layer = model.layer
    q_and_o = 2 * layer.hidden_size * layer.num_attention_heads * layer.head_dim
    k_and_v = 2 * layer.hidden_size * layer.num_key_value_heads * layer.head_dim
    mlp = 3 * layer.hidden_size * layer.intermediate_size
    lm_head = layer.hidden_size * model.vocab_size
    return model.num_hidden_layers * (q_and_o + k_and_v + mlp) + lm_head


def training_flops_per_token(
    params: Qwen3DenseForCausalLMParameters | Qwen3DenseParameters, seq_len: int
) -> TrainingFlopsPerToken:
    """Model FLOPs of one trained token (forward + backward), see the module docstring.

    Args:
        params: Causal-LM or backbone parameters.
        seq_len: The sequence length of the batch.

    Returns:
        The two terms of ``6 * N + 12 * L * H * head_dim * S``.

    Raises:
        ValueError: If ``seq_len`` is not positive.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    model = _backbone(params)
    layer = model.layer
    attention = 12 * model.num_hidden_layers * layer.num_attention_heads * layer.head_dim * seq_len
    return TrainingFlopsPerToken(matmul=6 * matmul_parameter_count(params), attention=attention)


def packed_training_flops_per_token(
    params: Qwen3DenseForCausalLMParameters | Qwen3DenseParameters,
    document_lengths: Sequence[int],
) -> TrainingFlopsPerToken:
    """Model FLOPs per real token when attention is restricted to each document.

    With packed rows a token attends only to its own document, so the attention term
    counts ``sum(n_i ** 2)`` over the documents (segments) ``n_i`` instead of ``S ** 2``
    per row, averaged over the ``sum(n_i)`` real tokens::

        flops_per_token = 6 * N + 12 * L * H * head_dim * sum(n_i ** 2) / sum(n_i)

    Same convention as :func:`training_flops_per_token`: the full ``n x n`` score matrix
    of each document (not its causal half), so that one document of length ``S`` gives
    exactly the unpacked number. Padding is not a document: it does no useful work, and
    the caller divides by real tokens only, so MFU is not inflated by padding or by
    attention across document boundaries that the mask skips.

    Args:
        params: Causal-LM or backbone parameters.
        document_lengths: Length of every document (or continuation chunk) the tokens
            belong to.

    Returns:
        The two terms per real token.

    Raises:
        ValueError: If there is no document or a length is not positive.
    """
    lengths = [int(n) for n in document_lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError("document_lengths must be a non-empty list of positive lengths")
    model = _backbone(params)
    layer = model.layer
    per_square = 12 * model.num_hidden_layers * layer.num_attention_heads * layer.head_dim
    attention = per_square * sum(n * n for n in lengths) / sum(lengths)
    return TrainingFlopsPerToken(
        matmul=6 * matmul_parameter_count(params), attention=round(attention)
    )
