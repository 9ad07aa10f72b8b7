"""What a resume may change: refused keys, allowed changes and how they are applied."""

import pytest
import torch

from d9d.train.config import load_train_config
from d9d.train.lr import LrMultiplier, build_lr_scheduler
from d9d.train.resume_policy import apply_changes, check_resume, compare_configs

BASE = {"steps": 20, "lr.warmup_steps": 2}


def _config(**items):
    return load_train_config(None, {**BASE, **items})


def _saved(**items) -> dict:
    return _config(**items).model_dump(mode="json")


def test_only_schedule_and_data_keys_count():
    fixed, changeable = compare_configs(
        _saved(), _config(**{"parallel.data_parallel_shard": 2, "output_dir": "x"}).model_dump()
    )
    assert fixed == [] and changeable == []
    fixed, changeable = compare_configs(
        _saved(), _config(**{"data.seq_len": 64, "clip.max_norm": 0.5}).model_dump(mode="json")
    )
    assert [str(c) for c in fixed] == ["data.seq_len: 128 -> 64"]
    assert [str(c) for c in changeable] == ["clip.max_norm: 1.0 -> 0.5"]


def test_changed_settings_are_refused_with_keys_and_values():
    new = _config(steps=30, **{"optimizer.lr": 1e-5, "lr.schedule": "constant"})
    with pytest.raises(ValueError) as err:
        check_resume(_saved(), new, path="ckpt/step-20", step=20)
    message = str(err.value)
    assert message.startswith("resuming ckpt/step-20 would change the run's settings: ")
    for part in (
        "lr.schedule: 'cosine' -> 'constant'",
        "optimizer.lr: 0.003 -> 1e-05",
        "steps: 20 -> 30",
    ):
        assert part in message
    assert "checkpoint.allow_changes=true" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"other data .*seed: 0 -> 1 \(checkpoint -> now\)"):
        check_resume(_saved(), _config(seed=1), path="p", step=20)
    allowed = new.model_copy(
        update={"checkpoint": new.checkpoint.model_copy(update={"allow_changes": True})}
    )
    assert len(check_resume(_saved(), allowed, path="p", step=20)) == 3
    with pytest.raises(ValueError, match=r"steps=10 is before the step of checkpoint p \(20\)"):
        short = _config(steps=10, **{"checkpoint.allow_changes": True})
        check_resume(_saved(), short, path="p", step=20)


def test_applied_changes_give_a_fresh_runs_learning_rate():
    # A 20-step cosine run, finished, then extended to 30 steps with a new peak and betas.
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=3e-3, betas=(0.9, 0.95))
    old = build_lr_scheduler(optimizer, "cosine", 20, warmup_steps=2, min_lr_ratio=0.1)
    for _ in range(20):
        optimizer.step()
        old.step()
    new = _config(steps=30, **{"optimizer.lr": 1e-3, "optimizer.betas": [0.8, 0.9]})
    scheduler = build_lr_scheduler(
        optimizer, "cosine", 30, warmup_steps=2, min_lr_ratio=0.1
    )  # as the trainer builds it: before the load, from the config
    # The checkpoint restores the old hyperparameters into the optimizer.
    optimizer.param_groups[0].update(lr=3e-4, initial_lr=3e-3, betas=(0.9, 0.95))
    changes = check_resume(
        _saved(),
        new.model_copy(
            update={"checkpoint": new.checkpoint.model_copy(update={"allow_changes": True})}
        ),
        path="p",
        step=20,
    )
    line = apply_changes(changes, new, [optimizer], [scheduler], 20)
    expected = 1e-3 * LrMultiplier("cosine", 30, 2, 0.1)(20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert "steps: 20 -> 30" in line and "rebuilt for 30 steps" in line
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-3 * LrMultiplier("cosine", 30, 2, 0.1)(21), rel=1e-12
    )
