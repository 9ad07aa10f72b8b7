"""LR schedules: warmup then cosine / linear / warmup-stable-decay on LambdaLR."""

import itertools
import math

import pytest
import torch

from d9d.train.lr import LrMultiplier, build_lr_scheduler


def _lrs(schedule, total=20, **kw):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_lr_scheduler(optimizer, schedule, total, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs("cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lrs[-1] == pytest.approx(0.2)  # the last step runs at the minimum
    # Halfway through the decay the cosine is at the mean of peak and minimum.
    mid = LrMultiplier("cosine", 20, 4, 0.1)(4 + 8 - 1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_linear_and_wsd_and_constant():
    linear = _lrs("linear", warmup_steps=0, min_lr_ratio=0.0, total=10)
    assert linear == pytest.approx([2.0 * (1 - (s + 1) / 10) for s in range(10)])
    wsd = _lrs("wsd", warmup_steps=2, min_lr_ratio=0.0, decay_steps=4, total=10)
    assert wsd[:6] == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert wsd[6:] == pytest.approx([1.5, 1.0, 0.5, 0.0])
    assert _lrs("constant", warmup_steps=1, total=3) == pytest.approx([2.0] * 3)


def test_state_dict_resumes():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_lr_scheduler(opt, "cosine", 10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_scheduler(opt2, "cosine", 10, warmup_steps=2)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bad_schedules():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LrMultiplier("exp", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LrMultiplier("cosine", 10, warmup_steps=11)
    with pytest.raises(ValueError, match="decay_steps"):
        LrMultiplier("wsd", 10, warmup_steps=5, decay_steps=6)
