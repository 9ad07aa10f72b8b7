"""Checkpoints that never lose a run or silently change it (one process).

Each test reads one scenario of ``_checkpoint_scenarios.one_process``, all run in one
spawned rank: verification of a corrupted checkpoint, refused and applied setting changes,
an old run in the folder, a rollback to an older step, preflight checks, a full disk
during a save, non-finite steps, half-written files, async saves and the command line's
one-line errors.
"""

import re

import pytest

from tests.helpers import run_spawned, scenario_result
from tests.train._loop_scenarios import write_corpus


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ckpt_rules")
    corpus = write_corpus(folder)
    return run_spawned(
        1, "tests.train._checkpoint_scenarios:one_process", timeout_s=480, corpus=str(corpus)
    )


def _case(results, name):
    (result,) = scenario_result(results, name)
    return result


def test_flipped_bytes_in_a_tensor_payload_are_refused(results):
    r = _case(results, "corruption")
    assert r["message"] is not None, "a corrupted checkpoint was resumed"
    assert f"{r['shard']} has CRC-32 " in r["message"]
    assert f"the newest verified checkpoint is {r['previous']}" in r["message"]
    assert f"checkpoint.resume_from={r['previous']}" in r["message"]


def test_changed_schedule_settings_are_refused_then_applied_on_request(results):
    r = _case(results, "settings")
    refusals = r["refusals"]
    assert "steps: 6 -> 10 (checkpoint -> now)" in refusals["steps"]
    assert "optimizer.lr: 0.003 -> 0.001" in refusals["lr"]
    assert "lr.schedule: 'cosine' -> 'constant'" in refusals["schedule"]
    for message in refusals.values():
        assert message.startswith(("resuming ", "checkpoint ")) and "\n" not in message
    assert "checkpoint.allow_changes=true" in refusals["steps"]
    assert re.search(
        r"other data or in another order: data\.seq_len: 32 -> 16", refusals["seq_len"]
    )
    # Applied: the LR of steps 7..10 is a fresh 10-step schedule's (same float formula).
    assert r["lrs"] == pytest.approx(r["fresh_lrs"], rel=1e-12)
    assert any(line.startswith("applied changed settings") for line in r["log"])
    assert r["constant_lrs"] == [0.003, 0.003]


def test_a_fresh_run_never_deletes_an_old_runs_checkpoints(results):
    r = _case(results, "old_run")
    assert r["refusal"] is not None
    assert f"{r['folder']} holds 2 checkpoint(s) (newest: step-8)" in r["refusal"]
    assert r["untouched"] == ["lineage.json", "step-4", "step-8"]
    # With checkpoint.overwrite the old ones are moved aside, the new ones kept.
    replaced = [n for n in r["after"] if n.startswith("replaced-")]
    assert len(replaced) == 1
    assert sorted(set(r["after"]) - set(replaced)) == ["lineage.json", "step-2", "step-4"]
    assert r["replaced"] == ["lineage.json", "step-4", "step-8"]
    assert r["metrics"] == [1, 2, 3, 4] and r["old_metrics"] == list(range(1, 9))
    assert r["missing"] == f"checkpoint.resume_from: {r['missing_path']} does not exist"


def test_a_rollback_starts_a_branch_that_a_restart_follows(results):
    r = _case(results, "rollback")
    assert any("new branch b1 from step-4" in line for line in r["fork_log"])
    # The old branch's checkpoints are all still there; the new one's are suffixed.
    assert r["after_fork"] == ["lineage.json", "step-12", "step-4", "step-8", "step-8.b1"]
    folder = r["folder"]
    assert any(f"resumed from {folder}/step-8.b1 at step 8" in line for line in r["restart_log"])
    assert r["after_restart"] == [
        "lineage.json",
        "step-12",
        "step-12.b1",
        "step-4",
        "step-8",
        "step-8.b1",
    ]
    # metrics.jsonl: one line per step, all of the live branch.
    assert r["metrics_steps"] == list(range(1, 13))
    assert r["metrics_losses"] == r["straight"][:4] + r["forked"] + r["restarted"]
    assert r["forked"] != r["straight"][4:8], "the new clip value must change the branch"
    assert r["b0_steps"] == list(range(1, 13)) and r["b0_losses"] == r["straight"]


def test_folders_and_free_space_are_checked_before_the_first_step(results):
    r = _case(results, "preflight")
    assert re.fullmatch(
        r"checkpoint\.folder .*a_file is a file, not a folder", r["checkpoint_file"]
    )
    assert r["checkpoint_proc"].startswith(
        "cannot create checkpoint.folder /proc/d9d-checkpoints: "
    )
    assert re.fullmatch(r"output_dir .*a_file is a file, not a folder", r["output_file"])
    assert re.match(
        r"cannot create output_dir .*a_file/run: Not a directory", r["output_under_file"]
    )
    assert not r["trained"], "no step may run before the folders are checked"
    assert r["no_space"].startswith(f"not enough free space for checkpoints in {r['folder']} on ")
    assert "0.0 MB free" in r["no_space"] and "need about " in r["no_space"]


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(results):
    r = _case(results, "enospc")
    folder = r["folder"]
    assert r["message"].startswith("no space left on ")
    assert f"writing {folder}/step-2.tmp: need about " in r["message"]
    assert f"{folder}/step-2.tmp was removed, the newest complete checkpoint is {folder}/step-1"
    assert r["after"] == ["lineage.json", "step-1"]
    assert any(line.startswith(f"resumed from {folder}/step-1 at step 1") for line in r["resumed"])


def test_non_finite_steps_never_prune_the_last_good_checkpoint(results):
    r = _case(results, "nonfinite")
    folder = r["folder"]
    # Steps 4, 5, 6 had NaN norms; step-3 is the last finite one and is kept.
    assert r["left"] == ["lineage.json", "step-3", "step-4", "step-5"]
    assert r["message"] == (
        "stopping at step 6: 3 non-finite gradient norms in a row "
        "(clip.max_consecutive_nonfinite); the last good checkpoint (finite gradient norm) "
        f"is {folder}/step-3"
    )
    assert r["code"] == 2


def test_the_command_line_stops_with_one_line_and_exit_2(results):
    r = _case(results, "cli_nonfinite")
    assert r["code"] == 2
    (error,) = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
    assert "2 non-finite gradient norms in a row" in error
    assert "no checkpoint of a step with a finite norm was saved" in error
    assert "Traceback" not in r["stderr"]


def test_sigterm_completes_the_background_save_then_exits_143(results):
    r = _case(results, "cli_sigterm_async")
    assert r["code"] == 143
    folder = r["folder"]
    (error,) = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
    assert error.startswith("error: stopped by SIGTERM after step ")
    # SIGTERM came while step-4 was being written; the main thread may have reached the
    # next save before handling it. Whichever save was in flight is completed.
    match = re.search(rf"completed the background save {folder}/(step-\d+);", error)
    assert match, error
    assert f"the newest complete checkpoint is {folder}/{match.group(1)}" in error
    assert "step-4" in r["left"] and match.group(1) in r["left"]
    assert not [name for name in r["left"] if name.endswith(".tmp")]
    # Training went on during the background write (the SIGTERM may land before step 5's
    # metrics line is written, but after the step).
    after = int(re.search(r"stopped by SIGTERM after step (\d+)", error).group(1))
    assert after >= 5 and r["metrics"][-1] in (after - 1, after)


def test_half_written_files_are_said_or_refused(results):
    r = _case(results, "tails")
    assert any("dropped the half-written last line 3 of" in line for line in r["log"])
    assert r["metrics"] == [1, 2, 3]
    assert f"{r['rng']} has 64 bytes, the manifest records " in r["rng_refusal"]
    assert f"the newest verified checkpoint is {r['previous']}" in r["rng_refusal"]


def test_async_saves_train_exactly_like_sync_saves(results):
    r = _case(results, "async")
    assert r["async"] == r["sync"] and r["same_params"]
    assert r["left"] == ["lineage.json", "step-4", "step-6"]
    assert len(r["saved"]) == 3 and all("blocking training" in line for line in r["saved"])
    assert [rec["step"] for rec in r["records"]] == [2, 4, 6]
    assert all(0 <= rec["blocking_seconds"] <= rec["seconds"] for rec in r["records"])
