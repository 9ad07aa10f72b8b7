"""Validation of ``position_ids`` (RoPE positions that also mark document boundaries)."""

import torch

_INDEX_DTYPES = (torch.int64, torch.int32)


def check_position_ids(
    position_ids: torch.Tensor,
    batch: int,
    seq: int,
    max_position_ids: int,
    *,
    check_values: bool = True,
) -> bool | None:
    """Checks ``position_ids`` and tells whether some row packs several documents.

    The shape and dtype checks are free. The value checks (range, and whether a row holds
    more than one document) read three numbers back from the device in one host sync; a
    caller that already validated the batch once per step can pass
    ``check_values=False``.

    A new document starts at every token whose position is not the previous token's + 1
    (a restart at 0, or any other jump).

    Args:
        position_ids: ``(batch, seq)`` integer positions.
        batch: Expected number of rows.
        seq: Expected sequence length.
        max_position_ids: Positions must lie in ``[0, max_position_ids)``.
        check_values: Also check the value range (one host sync).

    Returns:
        With ``check_values`` (and a tensor that holds data): ``True`` if some row holds
        more than one document, else ``False``. ``None`` when values were not read.

    Raises:
        ValueError: If ``position_ids`` is not a tensor, has the wrong shape or dtype, or
            holds a negative value or one ``>= max_position_ids``.
    """
    if not isinstance(position_ids, torch.Tensor):
        raise ValueError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if tuple(position_ids.shape) != (batch, seq):
        raise ValueError(
            f"position_ids shape {tuple(position_ids.shape)} does not match "
            f"(batch, seq) = {(batch, seq)}"
        )
    if position_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"position_ids must be int64 or int32, got dtype {position_ids.dtype}")
    if not check_values or position_ids.device.type == "meta" or position_ids.numel() == 0:
        return None
    low, high = position_ids.aminmax()
    jumps = (position_ids[:, 1:] != position_ids[:, :-1] + 1).any()
    low, high, packed = torch.stack([low.long(), high.long(), jumps.long()]).tolist()
    if low < 0:
        raise ValueError(f"position_ids must be non-negative, got a minimum of {low}")
    if high >= max_position_ids:
        raise ValueError(
            f"position_ids must be < max_position_ids={max_position_ids}, got a maximum of {high}"
        )
    return bool(packed)


def any_packed_row(position_ids: torch.Tensor) -> bool:
    """Whether some row holds more than one document (one host sync; ``False`` on meta).

    For callers that validated the values already (see :func:`check_position_ids`, which
    answers the same question within its own sync).
    """
    if position_ids.device.type == "meta" or position_ids.numel() == 0:
        return False
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())
