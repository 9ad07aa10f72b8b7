"""Branch rules of a checkpoint folder: what a start resumes, forks, refuses or moves aside."""

from pathlib import Path

import pytest

from d9d.checkpoint.lineage import (
    FoundCheckpoint,
    Lineage,
    checkpoint_name,
    lineage_of,
    move_aside,
    parse_checkpoint_name,
    plan_start,
)

FOLDER = Path("/runs/x/checkpoints")


def _found(*names: str, run: str = "r1", lineage: Lineage | None = None) -> list[FoundCheckpoint]:
    found = []
    for i, name in enumerate(names):
        step, branch = parse_checkpoint_name(name)
        manifest = {"run": run, "created": float(i)}
        if lineage is not None:
            manifest["lineage"] = lineage.to_json()
        found.append(FoundCheckpoint(FOLDER / name, step, branch, manifest))
    return found


def _plan(found, lineage, resume=True, resume_from=None, overwrite=False):
    return plan_start(
        FOLDER,
        found,
        lineage,
        resume=resume,
        resume_from=None if resume_from is None else FOLDER / resume_from,
        overwrite=overwrite,
    )


def test_names_round_trip():
    assert checkpoint_name(8, "b0") == "step-8" and checkpoint_name(8, "b3") == "step-8.b3"
    assert parse_checkpoint_name("step-8.b3") == (8, "b3")
    assert parse_checkpoint_name("step-8") == (8, "b0")
    for other in ("step-8.tmp", "step-x", "step-8.b0", "lineage.json", "replaced-1"):
        assert parse_checkpoint_name(other) is None


def test_fresh_and_plain_resume():
    plan = _plan([], None)
    assert plan.checkpoint is None and plan.new_run and plan.lineage.live == "b0"
    lineage = Lineage("r1")
    plan = _plan(_found("step-4", "step-8"), lineage)
    assert plan.checkpoint == FOLDER / "step-8" and not plan.new_run
    assert plan.previous_live is None


def test_resume_false_into_a_folder_with_checkpoints_is_refused_unless_overwrite():
    found = _found("step-16", "step-20")
    with pytest.raises(ValueError) as err:
        _plan(found, Lineage("r1"), resume=False)
    message = str(err.value)
    assert f"{FOLDER} holds 2 checkpoint(s) (newest: step-20)" in message
    assert "checkpoint.overwrite=true" in message and "checkpoint.resume=false" in message
    plan = _plan(found, Lineage("r1"), resume=False, overwrite=True)
    assert plan.checkpoint is None and plan.move_aside and plan.new_run
    assert plan.lineage.run != "r1"


def test_resume_from_an_older_checkpoint_forks_and_a_restart_follows_the_fork():
    lineage = Lineage("r1")
    found = _found("step-4", "step-8", "step-12")
    plan = _plan(found, lineage, resume_from="step-4")
    assert plan.checkpoint == FOLDER / "step-4"
    assert plan.lineage.live == "b1" and plan.previous_live == "b0"
    assert plan.lineage.branches["b1"] == {"parent": "b0", "fork_step": 4}
    # Killed before the new branch saved anything: a restart resumes its fork point, not
    # the old branch's newer step-12.
    assert _plan(found, plan.lineage).checkpoint == FOLDER / "step-4"
    # After its step-8 save, the restart resumes step-8.b1.
    found += _found("step-8.b1")
    assert _plan(found, plan.lineage).checkpoint == FOLDER / "step-8.b1"
    # A branch of the branch sees b1 up to its fork and b0 up to 4.
    lineage2 = Lineage.from_json(plan.lineage.to_json())
    b2 = lineage2.fork("b1", 8)
    assert lineage2.on_history(b2, "b1", 8) and lineage2.on_history(b2, "b0", 4)
    assert not lineage2.on_history(b2, "b0", 8) and not lineage2.on_history(b2, "b1", 9)


def test_resume_from_the_newest_of_another_branch_switches_to_it():
    lineage = Lineage(
        "r1",
        live="b1",
        branches={
            "b0": {"parent": None, "fork_step": None},
            "b1": {"parent": "b0", "fork_step": 4},
        },
    )
    found = _found("step-4", "step-12", "step-8.b1")
    plan = _plan(found, lineage, resume_from="step-12")
    assert plan.lineage.live == "b0" and plan.previous_live == "b1"
    assert set(plan.lineage.branches) == {"b0", "b1"}


def test_no_checkpoint_on_the_live_history_is_refused():
    lineage = Lineage(
        "r1",
        live="b1",
        branches={
            "b0": {"parent": None, "fork_step": None},
            "b1": {"parent": "b0", "fork_step": 4},
        },
    )
    with pytest.raises(ValueError, match=r"none on the history of branch b1"):
        _plan(_found("step-8", "step-12"), lineage)


def test_resume_from_another_folder_starts_a_new_run():
    plan = plan_start(
        FOLDER, [], None, resume=True, resume_from=Path("/elsewhere/step-3"), overwrite=False
    )
    assert plan.checkpoint == Path("/elsewhere/step-3") and plan.new_run
    with pytest.raises(ValueError, match="is outside"):
        plan_start(
            FOLDER,
            _found("step-1"),
            Lineage("r1"),
            resume=True,
            resume_from=Path("/elsewhere/step-3"),
            overwrite=False,
        )


def test_lineage_is_rebuilt_from_the_newest_manifest():
    lineage = Lineage("r1")
    lineage.fork("b0", 4)
    found = _found("step-4", "step-8.b1", lineage=lineage)
    rebuilt = lineage_of(found)
    assert rebuilt.run == "r1" and rebuilt.live == "b1" and "b1" in rebuilt.branches


def test_move_aside_keeps_everything(tmp_path):
    (tmp_path / "step-4").mkdir()
    (tmp_path / "step-4" / "x").write_text("kept")
    target = move_aside(tmp_path, ["step-4"])
    assert target.parent == tmp_path and target.name.startswith("replaced-")
    assert (target / "step-4" / "x").read_text() == "kept"
    assert move_aside(tmp_path, []) != target


def test_an_unreadable_lineage_file_is_named(tmp_path):
    from d9d.checkpoint.lineage import read_lineage, write_lineage

    assert read_lineage(tmp_path) is None
    write_lineage(tmp_path, Lineage("r1"))
    assert read_lineage(tmp_path) == Lineage("r1")
    (tmp_path / "lineage.json").write_text('{"run": ')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'lineage.json'} is unreadable .*delete it"):
        read_lineage(tmp_path)
