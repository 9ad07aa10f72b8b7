"""The checkpoint manager: exact round trip, atomic folders, keep-last, clear refusals."""

import random
import warnings

import pytest
import torch

from d9d.checkpoint.training import CheckpointError, CheckpointManager
from d9d.train.lr import build_lr_scheduler

PARAMS = {"hidden_size": 4}


@pytest.fixture(autouse=True)
def _quiet_dcp():
    # DCP warns that it runs without a process group: that is the point of these tests.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, "cosine", 20, warmup_steps=3)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _save(manager, step, trainer):
    model, optimizer, scheduler = trainer
    return manager.save(
        step,
        [model],
        [optimizer],
        scheduler=scheduler,
        data_state={"epoch": step},
        model_params=PARAMS,
    )


def test_round_trip_continues_exactly(tmp_path):
    straight = _trainer()
    for _ in range(3):
        _step(*straight)
    manager = CheckpointManager(tmp_path, keep_last=2)
    path = _save(manager, 3, straight)
    assert path.name == "step-3" and manager.latest() == path
    random.random()  # the RNG states are restored too
    expected_python = random.random()
    for _ in range(3):
        _step(*straight)

    resumed = _trainer(seed=1)  # other weights: all must come from the checkpoint
    model, optimizer, scheduler = resumed
    state = manager.load(path, [model], [optimizer], schedulers=[scheduler], model_params=PARAMS)
    assert state.step == 3 and state.data_state == {"epoch": 3}
    random.random()
    assert random.random() == expected_python
    for _ in range(3):
        _step(*resumed)
    for a, b in zip(straight[0].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == straight[2].get_last_lr()


def test_keep_last_and_tmp_ignored(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    trainer = _trainer()
    for step in (1, 2, 3):
        _save(manager, step, trainer)
    assert [p.name for p in manager.complete_checkpoints()] == ["step-2", "step-3"]
    # A save that crashed before its rename leaves only a .tmp folder: never resumed from.
    (tmp_path / "step-9.tmp").mkdir()
    assert manager.latest().name == "step-3"
    _save(manager, 4, trainer)
    assert not (tmp_path / "step-9.tmp").exists()


def test_corrupted_latest_names_it_and_the_previous(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    trainer = _trainer()
    _save(manager, 1, trainer)
    latest = _save(manager, 2, trainer)
    for shard in latest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])  # truncated mid-write by a full disk
    model, optimizer, _ = _trainer()
    with pytest.raises(CheckpointError, match=r"step-2.*resume_from=.*step-1"):
        manager.load(latest, [model], [optimizer])
    (latest / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-2 is corrupted or incomplete.*step-1"):
        manager.load(latest, [model], [optimizer])


def test_incompatible_model_refused(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = _save(manager, 1, _trainer())
    model, optimizer, _ = _trainer()
    with pytest.raises(CheckpointError, match="incompatible model: hidden_size: checkpoint 4, "):
        manager.load(path, [model], [optimizer], model_params={"hidden_size": 8})
    with pytest.raises(ValueError, match="one optimizer per stage module"):
        manager.load(path, [model], [])
