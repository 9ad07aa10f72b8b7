"""Folder and free-space checks before the first step, with one-line errors."""

import pytest

from d9d.train import preflight
from d9d.train.config import load_train_config


def test_folders_that_cannot_hold_a_run(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert (
        preflight.probe_folder("output_dir", a_file)
        == f"output_dir {a_file} is a file, not a folder"
    )
    under = preflight.probe_folder("output_dir", a_file / "sub")
    assert under.startswith(f"cannot create output_dir {a_file / 'sub'}: Not a directory")
    in_proc = preflight.probe_folder("checkpoint.folder", preflight.Path("/proc/d9d-checkpoints"))
    assert in_proc.startswith("cannot create checkpoint.folder /proc/d9d-checkpoints: ")
    assert preflight.probe_folder("output_dir", tmp_path / "new" / "deep") is None
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe is gone


def test_prepare_folders_raises_the_first_problem(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    config = load_train_config(
        None, {"output_dir": str(tmp_path / "out"), "checkpoint.folder": str(a_file)}
    )
    with pytest.raises(ValueError, match=rf"^checkpoint\.folder {a_file} is a file, not a folder$"):
        preflight.prepare_folders(config)
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize(
    ("items", "step", "saves"),
    [
        ({"steps": 20, "checkpoint.interval": 4}, 0, 5),
        ({"steps": 20, "checkpoint.interval": 4}, 8, 3),
        ({"steps": 22, "checkpoint.interval": 4}, 0, 6),  # 5 by interval + the final one
        ({"steps": 22, "checkpoint.interval": 0}, 0, 1),
        ({"steps": 22, "checkpoint.save_final": False, "checkpoint.export_hf": False}, 0, 0),
    ],
)
def test_saves_left(items, step, saves):
    assert preflight.saves_left(load_train_config(None, items), step) == saves


def test_not_enough_space_names_folder_device_and_need(tmp_path, monkeypatch):
    config = load_train_config(
        None,
        {
            "output_dir": str(tmp_path),
            "steps": 20,
            "checkpoint.interval": 4,
            "checkpoint.keep_last": 2,
            "checkpoint.export_hf": False,
        },
    )
    params = config.model.parameters(128, 258, True)
    numels = preflight.model_parameter_numels(params)
    one = preflight.estimate_checkpoint_bytes(numels, 4)
    monkeypatch.setattr(preflight, "free_bytes", lambda _p: 2 * one)
    with pytest.raises(ValueError) as err:
        preflight.check_free_space(
            config, params, preflight.torch.float32, step=0, own_checkpoints=0
        )
    message = str(err.value)
    assert message.startswith(
        f"not enough free space for checkpoints in {config.checkpoint_folder} on "
    )
    assert f"need about {preflight.size_text(3 * one)} for 3 new checkpoint(s)" in message
    assert "checkpoint.keep_last=2 kept plus the one being written" in message
    # Two checkpoints of the branch already there: only one more is needed at a time.
    assert (
        preflight.check_free_space(
            config, params, preflight.torch.float32, step=8, own_checkpoints=2
        )
        == one
    )
