"""Input value checks that need a device-to-host sync, and the switch that skips them.

Checking that every token id lies inside the vocabulary reads a reduction back to the
host: one synchronisation per call. A model called directly checks its inputs on every
call (clear errors first). A training step that has already validated its whole batch
once (``PipelineSchedule.step``, the training loop) runs its microbatches inside
:func:`inputs_prevalidated`, so that the stages do not synchronise once per microbatch.
Shape and dtype checks cost nothing and always run.
"""

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


def value_checks_enabled() -> bool:
    """Whether per-call value checks (token ranges, position ranges) run here."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def inputs_prevalidated() -> Iterator[None]:
    """Skips the per-call value checks inside the block (the caller validated the batch)."""
    previous = value_checks_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


def check_integer_ids(ids: torch.Tensor, name: str) -> None:
    """Raises ``ValueError`` unless ``ids`` is an integer tensor (no sync)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids (e.g. torch.long), got dtype {ids.dtype}")


def check_token_range(
    ids: torch.Tensor, vocab_size: int, name: str, ignore_index: int | None = None
) -> None:
    """Raises ``ValueError`` if ``ids`` holds a value outside ``[0, vocab_size)``.

    ``ignore_index`` (e.g. ``-100`` for labels) is allowed as well. Meta tensors are not
    checked, nor is anything inside :func:`inputs_prevalidated`. The check costs one host
    sync, so it is kept out of compiled regions.
    """
    check_integer_ids(ids, name)
    if not value_checks_enabled() or ids.device.type == "meta" or ids.numel() == 0:
        return
    valid = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if not bool(valid.all()):
        bad = ids[~valid]
        allowed = f"[0, {vocab_size})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise ValueError(
            f"{name} holds {bad.numel()} value(s) outside {allowed}, "
            f"e.g. {bad.flatten()[:5].tolist()}"
        )
