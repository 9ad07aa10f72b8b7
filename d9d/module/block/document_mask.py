"""Document masks for packed rows, derived from ``position_ids``.

A row may hold several documents: a new one starts at every token whose position is not
the previous token's + 1 (a restart at 0, or a continuation chunk that starts at 40). A
token attends only to earlier tokens of its own document.

The mask is built once per stage forward, outside the compiled layers, and the same
object is handed to every layer:

* ``sdpa``: a boolean ``(batch, 1, seq, seq)`` mask (causal AND same document) for
  ``scaled_dot_product_attention``. Exact, works everywhere with a backward; on the CPU
  it runs the same flash kernel as plain causal attention, without skipping the masked
  blocks.
* ``flex``: a FlexAttention ``BlockMask`` (block-sparse: blocks that are fully masked are
  skipped, fully visible blocks skip the mask). Its ``mask_mod`` reads the document ids
  tensor, so a new layout of the same shape reuses the compiled kernels. torch 2.13's
  FlexAttention has no CPU backward, so this is the CUDA training path.

Rows whose positions are all consecutive (and ``position_ids=None``) get no mask at all:
attention stays the plain causal kernel.

Context parallelism needs the rectangular case: a rank's queries (a subset of the row's
tokens) against every key of the row, in the order the keys were gathered. Causality
then compares *global* token indices, not slots: :func:`build_sharded_document_mask`
builds both backends' masks from the queries' and keys' global indices and document ids.
"""

import functools
from enum import StrEnum

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


class AttentionBackend(StrEnum):
    """Which kernel attends over packed rows.

    Attributes:
        auto: ``flex`` on CUDA, ``sdpa`` elsewhere.
        sdpa: ``scaled_dot_product_attention`` with a boolean document mask.
        flex: FlexAttention with a block-sparse ``BlockMask`` (forward only on the CPU).
    """

    auto = "auto"
    sdpa = "sdpa"
    flex = "flex"


def resolve_attention_backend(
    backend: AttentionBackend | str, device: torch.device
) -> AttentionBackend:
    """Returns the concrete backend (``sdpa`` or ``flex``) for ``device``.

    Raises:
        ValueError: If ``backend`` is not one of ``auto``, ``sdpa``, ``flex``.
    """
    try:
        backend = AttentionBackend(backend)
    except ValueError as err:
        choices = ", ".join(b.value for b in AttentionBackend)
        raise ValueError(f"attention backend must be one of {choices}, got {backend!r}") from err
    if backend is AttentionBackend.auto:
        return AttentionBackend.flex if device.type == "cuda" else AttentionBackend.sdpa
    return backend


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Numbers the documents of each row: ``(batch, seq)`` int32, starting at 0 per row.

    Args:
        position_ids: ``(batch, seq)`` integer positions.
    """
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = torch.zeros_like(position_ids[:, :1], dtype=torch.int32)
    return torch.cat([first, starts.to(torch.int32)], dim=1).cumsum(1, dtype=torch.int32)


def sdpa_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The boolean ``(batch, 1, seq, seq)`` mask: causal and same document (True = attend).

    Every query sees at least itself, so no softmax row is empty.
    """
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_document & causal).unsqueeze(1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as SDPA's additive form: 0 or -inf.

    ``scaled_dot_product_attention`` turns a boolean mask into this on every call and
    keeps that copy for its backward: once per layer. Converted once per stage forward,
    the one tensor is shared by every layer instead.

    Args:
        mask: A boolean mask.
        dtype: The attention's compute dtype (SDPA wants the query's).
    """
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, float("-inf"))


FLEX_BLOCK_SIZE = 128
"""Block size of the FlexAttention masks (create_block_mask's default)."""


@functools.cache
def _compiled_create_block_mask():
    # Compiled, create_block_mask evaluates the mask_mod block by block instead of
    # materialising a (batch, seq, seq) boolean mask; the document ids are a graph input,
    # so a new layout of the same shape does not recompile.
    return torch.compile(create_block_mask)


def flex_document_block_mask(
    document_ids: torch.Tensor, *, compiled: bool | None = None
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of causal, same-document attention.

    Args:
        document_ids: ``(batch, seq)`` document numbers from
            :func:`document_ids_from_position_ids`.
        compiled: Build the mask with a compiled ``create_block_mask`` (no dense
            ``seq x seq`` mask). Defaults to ``True`` on CUDA; the eager build is
            exact too and avoids a compile on the CPU.

    Returns:
        A mask over ``seq`` rounded up to a multiple of :data:`FLEX_BLOCK_SIZE`
        (``block_mask.seq_lengths``); pad q/k/v to that length before attending.
    """
    batch, seq = document_ids.shape
    # torch 2.13's flex kernels read whole blocks past a sequence length that is not a
    # multiple of the block size (garbage, even NaN, in the last rows on the CPU). The mask
    # therefore covers the sequence padded to whole blocks; the padding gets document id
    # -1, a document of its own that no real token sees, and ``GroupedQueryAttention``
    # pads q/k/v to the same length (a no-op for the usual multiple-of-128 lengths).
    padded_seq = seq + (-seq) % FLEX_BLOCK_SIZE
    padded = torch.nn.functional.pad(document_ids, (0, padded_seq - seq), value=-1)

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (padded[b, q_idx] == padded[b, kv_idx])

    if compiled is None:
        compiled = document_ids.device.type == "cuda"
    build = _compiled_create_block_mask() if compiled else create_block_mask
    return build(
        document_causal,
        batch,
        None,
        padded_seq,
        padded_seq,
        device=document_ids.device,
        BLOCK_SIZE=FLEX_BLOCK_SIZE,
    )


def build_document_mask(
    position_ids: torch.Tensor, backend: AttentionBackend | str
) -> torch.Tensor | BlockMask:
    """The attention mask of packed rows, for the backend that will consume it.

    Call it once per stage forward (outside compiled regions) and hand the result to every
    layer.

    Args:
        position_ids: ``(batch, seq)`` positions; documents start where they jump.
        backend: ``auto``, ``sdpa`` or ``flex`` (see :class:`AttentionBackend`).

    Returns:
        A boolean SDPA mask or a FlexAttention ``BlockMask``.

    Raises:
        ValueError: If ``backend`` is unknown, or ``flex`` is asked on the CPU while
            gradients are enabled (torch has no CPU FlexAttention backward).
    """
    resolved = resolve_attention_backend(backend, position_ids.device)
    document_ids = document_ids_from_position_ids(position_ids)
    if resolved is AttentionBackend.sdpa:
        return sdpa_document_mask(document_ids)
    check_flex_backward(position_ids.device)
    return flex_document_block_mask(document_ids)


def sdpa_sharded_document_mask(
    q_index: torch.Tensor, kv_index: torch.Tensor, q_docs: torch.Tensor, kv_docs: torch.Tensor
) -> torch.Tensor:
    """The boolean ``(batch, 1, num_q, num_kv)`` mask of some queries over some keys.

    Query ``i`` attends key ``j`` when ``kv_index[j] <= q_index[i]`` (causal by global
    token index) and both belong to the same document. A query sees at least itself when
    its own token is among the keys, so no softmax row is empty.

    Args:
        q_index: ``(num_q,)`` global token indices of the queries.
        kv_index: ``(num_kv,)`` global token indices of the keys.
        q_docs: ``(batch or 1, num_q)`` document ids of the queries.
        kv_docs: ``(batch or 1, num_kv)`` document ids of the keys.
    """
    causal = kv_index[None, :] <= q_index[:, None]
    same_document = q_docs[:, :, None] == kv_docs[:, None, :]
    return (same_document & causal).unsqueeze(1)


def flex_sharded_document_block_mask(
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
    q_docs: torch.Tensor,
    kv_docs: torch.Tensor,
    *,
    compiled: bool | None = None,
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of :func:`sdpa_sharded_document_mask`.

    Both lengths are rounded up to a multiple of :data:`FLEX_BLOCK_SIZE` (see
    :func:`flex_document_block_mask`; ``block_mask.seq_lengths`` gives them): padded keys
    get document id -1 and are seen by no real query; padded queries see key 0 only, so
    that no row of the kernel is empty.

    Args:
        q_index: ``(num_q,)`` global token indices of the queries.
        kv_index: ``(num_kv,)`` global token indices of the keys.
        q_docs: ``(batch or 1, num_q)`` document ids of the queries.
        kv_docs: ``(batch or 1, num_kv)`` document ids of the keys.
        compiled: As in :func:`flex_document_block_mask` (default: on CUDA).
    """
    num_q, num_kv = q_index.shape[0], kv_index.shape[0]
    padded_q = num_q + (-num_q) % FLEX_BLOCK_SIZE
    padded_kv = num_kv + (-num_kv) % FLEX_BLOCK_SIZE
    pad = torch.nn.functional.pad
    q_index, kv_index = pad(q_index, (0, padded_q - num_q)), pad(kv_index, (0, padded_kv - num_kv))
    q_docs = pad(q_docs, (0, padded_q - num_q), value=-1)
    kv_docs = pad(kv_docs, (0, padded_kv - num_kv), value=-1)

    def sharded_document_causal(b, h, q_idx, kv_idx):
        real = (q_docs[b, q_idx] == kv_docs[b, kv_idx]) & (kv_index[kv_idx] <= q_index[q_idx])
        padded_query = (q_docs[b, q_idx] < 0) & (kv_idx == 0)
        return real | padded_query

    if compiled is None:
        compiled = q_index.device.type == "cuda"
    build = _compiled_create_block_mask() if compiled else create_block_mask
    return build(
        sharded_document_causal,
        q_docs.shape[0],
        None,
        padded_q,
        padded_kv,
        device=q_index.device,
        BLOCK_SIZE=FLEX_BLOCK_SIZE,
    )


def build_sharded_document_mask(
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
    q_docs: torch.Tensor,
    kv_docs: torch.Tensor,
    backend: AttentionBackend | str,
) -> torch.Tensor | BlockMask:
    """The causal same-document mask of some queries over some keys, for ``backend``.

    Args:
        q_index: ``(num_q,)`` global token indices of the queries.
        kv_index: ``(num_kv,)`` global token indices of the keys (any order).
        q_docs: ``(batch or 1, num_q)`` document ids of the queries.
        kv_docs: ``(batch or 1, num_kv)`` document ids of the keys.
        backend: ``auto``, ``sdpa`` or ``flex``.

    Raises:
        ValueError: If ``backend`` is unknown, or ``flex`` is asked on the CPU while
            gradients are enabled.
    """
    resolved = resolve_attention_backend(backend, q_index.device)
    if resolved is AttentionBackend.sdpa:
        return sdpa_sharded_document_mask(q_index, kv_index, q_docs, kv_docs)
    check_flex_backward(q_index.device)
    return flex_sharded_document_block_mask(q_index, kv_index, q_docs, kv_docs)


def check_flex_backward(device: torch.device) -> None:
    """Raises ``ValueError`` for FlexAttention with gradients on the CPU (no backward there)."""
    if device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError(
            "attention backend 'flex' has no backward on the CPU in this torch version; use "
            "'sdpa' (or 'auto') to train on the CPU, or run flex under torch.no_grad()"
        )
