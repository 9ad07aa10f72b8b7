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
    if position_ids.device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError(
            "attention backend 'flex' has no backward on the CPU in this torch version; use "
            "'sdpa' (or 'auto') to train on the CPU, or run flex under torch.no_grad()"
        )
    return flex_document_block_mask(document_ids)
