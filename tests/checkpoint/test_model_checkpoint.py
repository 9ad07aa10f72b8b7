"""A model checkpoint in one process: exact round trip, and no DCP warning about it."""

import warnings

import torch

from d9d.checkpoint import load_model_checkpoint, save_model_checkpoint
from tests.helpers import build_causal_lm, randomize_


def test_one_process_round_trip_is_exact_and_quiet(tmp_path):
    torch.manual_seed(0)
    source = randomize_(build_causal_lm(2))
    target = build_causal_lm(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model_checkpoint(source, str(tmp_path / "ckpt"))
        load_model_checkpoint(target, str(tmp_path / "ckpt"))
        # The filter is scoped to DCP's calls: the caller's own warnings still show.
        warnings.warn("the caller's own warning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "torch.distributed is disabled" in m], messages
    assert "the caller's own warning" in messages
    for (name, got), (_, want) in zip(
        target.state_dict().items(), source.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name
