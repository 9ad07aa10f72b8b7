"""Whole-batch input validation, run once per training step instead of per microbatch.

The model checks what it is given on every call; inside a pipeline schedule that means
one host synchronisation per check, per microbatch, per stage. :func:`validate_batch`
checks a whole step's batch at once (shapes and dtypes, then every value range with a
single synchronisation) so that the step can run its microbatches inside
``d9d.core.checks.inputs_prevalidated()``.
"""

from collections.abc import Mapping

import torch

from d9d.core.checks import check_integer_ids
from d9d.core.constants import IGNORE_INDEX
from d9d.module.block.position_ids import check_position_ids
from d9d.module.model.qwen3_dense.model import check_batch_shape
from d9d.module.model.qwen3_dense.params import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseParameters,
)

_MASK_KEYS = ("hidden_states_agg_mask", "pooling_mask")


def validate_batch(
    params: Qwen3DenseForCausalLMParameters
    | Qwen3DenseForClassificationParameters
    | Qwen3DenseParameters,
    batch: Mapping[str, torch.Tensor],
) -> None:
    """Checks one step's batch against the model, with at most one host sync.

    ``input_ids`` must be integer ``(batch, seq)`` with ``seq >= 1`` and ids inside the
    vocabulary; ``position_ids`` (optional) integer, same shape, in
    ``[0, max_position_ids)``; ``labels`` (causal LM) integer, same shape, inside the
    vocabulary or -100; ``labels`` (classification) integer, one per row, in
    ``[0, num_labels)`` or -100; ``hidden_states_agg_mask`` / ``pooling_mask`` same shape.

    Args:
        params: The model's parameters (causal LM, classification or backbone).
        batch: The batch a step is given.

    Raises:
        ValueError: Naming the first input that is wrong and how.
    """
    backbone = params if isinstance(params, Qwen3DenseParameters) else params.model
    if "input_ids" not in batch:
        raise ValueError(f"the batch has no 'input_ids' (keys: {sorted(batch)})")
    input_ids = batch["input_ids"]
    check_integer_ids(input_ids, "input_ids")
    check_batch_shape(input_ids, "input_ids")
    shape = tuple(input_ids.shape)
    # (tensor, low, high, allowed extra value) for every range checked below.
    ranges: list[tuple[str, torch.Tensor, int, int, int | None]] = [
        ("input_ids", input_ids, 0, backbone.vocab_size, None)
    ]
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        check_integer_ids(position_ids, "position_ids")
        # The model's own shape/dtype rules; the range joins the single sync below.
        check_position_ids(position_ids, *shape, backbone.max_position_ids, check_values=False)
        ranges.append(("position_ids", position_ids, 0, backbone.max_position_ids, None))
    for key in _MASK_KEYS:
        if batch.get(key) is not None:
            _check_shape(batch[key], key, shape)
    labels = batch.get("labels")
    if labels is not None:
        check_integer_ids(labels, "labels")
        if isinstance(params, Qwen3DenseForClassificationParameters):
            if labels.dim() != 1:
                raise ValueError(
                    f"classification labels must hold one class per row, shape (batch,), "
                    f"got {tuple(labels.shape)}"
                )
            ranges.append(("labels", labels, 0, params.num_labels, IGNORE_INDEX))
        else:
            _check_shape(labels, "labels", shape)
            ranges.append(("labels", labels, 0, backbone.vocab_size, IGNORE_INDEX))
    _check_ranges(ranges)


def _check_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but input_ids is (batch, seq) = {shape}"
        )


def _valid(tensor: torch.Tensor, low: int, high: int, extra: int | None) -> torch.Tensor:
    valid = (tensor >= low) & (tensor < high)
    if extra is not None:
        valid |= tensor == extra
    return valid


def _check_ranges(ranges: list[tuple[str, torch.Tensor, int, int, int | None]]) -> None:
    checked = [r for r in ranges if r[1].device.type != "meta" and r[1].numel()]
    if not checked:
        return
    flags = torch.stack([_valid(t, low, high, extra).all() for _, t, low, high, extra in checked])
    if bool(flags.all()):  # the one host sync of a valid batch
        return
    for name, tensor, low, high, extra in checked:
        valid = _valid(tensor, low, high, extra)
        if not bool(valid.all()):
            bad = tensor[~valid]
            allowed = f"[0, {high})" + (f" or {extra}" if extra is not None else "")
            limit = " (max_position_ids)" if name == "position_ids" else ""
            raise ValueError(
                f"{name} holds {bad.numel()} value(s) outside {allowed}{limit}, "
                f"e.g. {bad.flatten()[:5].tolist()}"
            )
