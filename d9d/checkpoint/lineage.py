"""Runs and branches of a checkpoint folder: which checkpoints a run may resume and prune.

A *run* is everything trained into one checkpoint folder from one fresh start (a random
id). Resuming from an older checkpoint of a run (``checkpoint.resume_from``) starts a new
*branch* of it: its steps after that checkpoint are another history than the one already
on disk. Branch ``b0`` is the run's first; ``b<k>`` records its parent branch and the step
it forked at. Checkpoints are named ``step-<N>`` on ``b0`` and ``step-<N>.b<k>`` on later
branches, so two branches never write the same folder.

``lineage.json`` in the checkpoint folder records the run, its branches and the *live*
branch (the one that ran last); every checkpoint's manifest carries a copy, so the file
can be rebuilt if it is lost. The rules this module decides:

* a plain restart (``resume = true``) continues the live branch from the newest
  checkpoint on its history (its own checkpoints, then its parent's up to the fork step,
  and so on);
* ``resume_from`` the newest checkpoint of a branch continues that branch (it becomes
  live); ``resume_from`` an older one forks a new branch;
* ``resume = false`` into a folder holding checkpoints is refused, unless
  ``checkpoint.overwrite`` moves them aside (into ``replaced-<time>/``);
* a save prunes only checkpoints of its own branch (see ``CheckpointManager``).
"""

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from d9d.checkpoint.manifest import fsync_dir, write_file_synced

ROOT_BRANCH = "b0"
LINEAGE_FILE = "lineage.json"
_NAME = re.compile(r"^step-(\d+)(?:\.(b[1-9]\d*))?$")


def checkpoint_name(step: int, branch: str) -> str:
    """The folder name of branch ``branch``'s checkpoint of step ``step``."""
    return f"step-{step}" if branch == ROOT_BRANCH else f"step-{step}.{branch}"


def parse_checkpoint_name(name: str) -> tuple[int, str] | None:
    """``(step, branch)`` of a checkpoint folder name, or ``None`` for any other name."""
    match = _NAME.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2) or ROOT_BRANCH


@dataclass
class Lineage:
    """The run of a checkpoint folder and its branches.

    Attributes:
        run: The run's id (random, fixed at its fresh start).
        live: The branch that ran last.
        branches: Branch id -> ``{"parent": id or None, "fork_step": int or None}``.
    """

    run: str
    live: str = ROOT_BRANCH
    branches: dict[str, dict] = field(
        default_factory=lambda: {ROOT_BRANCH: {"parent": None, "fork_step": None}}
    )

    @classmethod
    def new(cls) -> "Lineage":
        """A fresh run with one branch, ``b0``."""
        return cls(run=uuid.uuid4().hex[:12])

    def to_json(self) -> dict:
        """The JSON form (``lineage.json`` and the manifests' copy)."""
        return {"run": self.run, "live": self.live, "branches": self.branches}

    @classmethod
    def from_json(cls, data: dict) -> "Lineage":
        """Reads :meth:`to_json`'s form."""
        return cls(run=str(data["run"]), live=str(data["live"]), branches=dict(data["branches"]))

    def on_history(self, branch: str, ckpt_branch: str, ckpt_step: int) -> bool:
        """Whether checkpoint ``(ckpt_branch, ckpt_step)`` is on ``branch``'s history."""
        limit = None
        current: str | None = branch
        while current is not None and current in self.branches:
            if current == ckpt_branch:
                return limit is None or ckpt_step <= limit
            info = self.branches[current]
            limit = info["fork_step"]
            current = info["parent"]
        return False

    def fork(self, parent: str, step: int) -> str:
        """Adds a branch forking from ``parent`` at ``step``; returns its id."""
        number = 1 + max(int(b[1:]) for b in self.branches)
        branch = f"b{number}"
        self.branches[branch] = {"parent": parent, "fork_step": step}
        return branch


def read_lineage(folder: str | os.PathLike) -> Lineage | None:
    """The folder's ``lineage.json``, or ``None`` if it has none.

    Raises:
        ValueError: If the file exists but cannot be read.
    """
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return Lineage.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is unreadable ({err}); delete it to rebuild it from the checkpoints"
        ) from err


def write_lineage(folder: str | os.PathLike, lineage: Lineage) -> None:
    """Writes ``lineage.json`` atomically."""
    folder = Path(folder)
    tmp = folder / f"{LINEAGE_FILE}.tmp"
    write_file_synced(tmp, json.dumps(lineage.to_json(), indent=1).encode())
    os.replace(tmp, folder / LINEAGE_FILE)
    fsync_dir(folder)


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint folder found on disk.

    Attributes:
        path: The folder.
        step: Its step (from the name).
        branch: Its branch (from the name).
        manifest: Its manifest, or ``None`` if it has none (never verified).
    """

    path: Path
    step: int
    branch: str
    manifest: dict | None


@dataclass
class StartPlan:
    """How a run starts: fresh or from which checkpoint, on which branch.

    Attributes:
        checkpoint: The checkpoint to resume from (``None``: a fresh start).
        lineage: The lineage to write once the start has succeeded (its ``live`` is the
            branch this run continues).
        previous_live: The branch that was live before, when this start changes it
            (its metrics are archived), else ``None``.
        move_aside: Whether the folder's existing checkpoints are moved aside first.
        new_run: Whether a new run starts (fresh, or from another folder's checkpoint).
        note: A log line saying what was decided (empty for a plain fresh start).
    """

    checkpoint: Path | None
    lineage: Lineage
    previous_live: str | None = None
    move_aside: bool = False
    new_run: bool = False
    note: str = ""


def lineage_of(found: list[FoundCheckpoint]) -> Lineage | None:
    """The lineage recorded in the most recently written manifest (``lineage.json`` lost)."""
    recorded = [f for f in found if f.manifest and "lineage" in f.manifest]
    if not recorded:
        return None
    newest = max(recorded, key=lambda f: f.manifest.get("created", 0.0))
    lineage = Lineage.from_json(newest.manifest["lineage"])
    lineage.live = newest.branch
    return lineage


def _newest(found: list[FoundCheckpoint]) -> FoundCheckpoint:
    return max(found, key=lambda f: f.step)


def plan_start(
    folder: Path,
    found: list[FoundCheckpoint],
    lineage: Lineage | None,
    *,
    resume: bool,
    resume_from: Path | None,
    overwrite: bool,
) -> StartPlan:
    """Decides how a run starts (see the module docstring for the rules).

    Args:
        folder: The checkpoint folder.
        found: Its checkpoints.
        lineage: Its lineage (``lineage.json``, or rebuilt by :func:`lineage_of`).
        resume: ``checkpoint.resume``.
        resume_from: ``checkpoint.resume_from``.
        overwrite: ``checkpoint.overwrite``.

    Returns:
        The plan.

    Raises:
        ValueError: For a start that would resume into, or write over, another run's
            or branch's checkpoints (naming the folder and its newest step).
    """
    if found and lineage is None:
        lineage = Lineage.new()  # checkpoints without manifests: verification refuses them
    occupied = ""
    if found:
        newest = _newest(found)
        occupied = f"{folder} holds {len(found)} checkpoint(s) (newest: {newest.path.name})"

    def fresh(reason: str) -> StartPlan:
        if found and not overwrite:
            raise ValueError(
                f"{reason}, but {occupied}; set checkpoint.resume=true to continue them, "
                "checkpoint.overwrite=true to move them aside, or use another "
                "output_dir / checkpoint.folder"
            )
        note = f"moved the checkpoints of {folder} aside (checkpoint.overwrite)" if found else ""
        return StartPlan(None, Lineage.new(), move_aside=bool(found), new_run=True, note=note)

    if resume_from is not None:
        parsed = parse_checkpoint_name(resume_from.name)
        inside = resume_from.parent.resolve() == folder.resolve()
        if not inside or parsed is None:
            # Another folder's checkpoint starts a new run here.
            plan = fresh(f"checkpoint.resume_from={resume_from} is outside {folder}")
            plan.checkpoint = resume_from
            plan.note = "; ".join(
                n for n in (plan.note, f"a new run starts from {resume_from}") if n
            )
            return plan
        step, branch = parsed
        assert lineage is not None
        if branch not in lineage.branches:
            raise ValueError(
                f"checkpoint.resume_from={resume_from}: branch {branch} is not in "
                f"{folder / LINEAGE_FILE} (a checkpoint of another run?)"
            )
        own = [f for f in found if f.branch == branch]
        previous = lineage.live
        if not own or step >= _newest(own).step:
            lineage.live = branch
            note = "" if branch == previous else f"switched to branch {branch}"
        else:
            new_branch = lineage.fork(branch, step)
            lineage.live = new_branch
            note = (
                f"new branch {new_branch} from {resume_from.name} (the checkpoints after it "
                f"stay on branch {branch}, untouched)"
            )
        return StartPlan(
            resume_from,
            lineage,
            previous_live=previous if lineage.live != previous else None,
            note=note,
        )
    if not resume:
        return fresh("checkpoint.resume=false")
    if not found:
        return StartPlan(None, Lineage.new(), new_run=True)
    assert lineage is not None
    history = [f for f in found if lineage.on_history(lineage.live, f.branch, f.step)]
    if not history:
        raise ValueError(
            f"{occupied}, none on the history of branch {lineage.live} that ran last; "
            "set checkpoint.resume_from to the checkpoint to continue"
        )
    return StartPlan(_newest(history).path, lineage)


def move_aside(folder: Path, names: list[str]) -> Path:
    """Moves ``names`` (entries of ``folder``) into a new ``folder/replaced-<time>``.

    Returns:
        The folder they were moved into.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder / f"replaced-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"replaced-{stamp}-{suffix}"
    target.mkdir()
    for name in names:
        os.replace(folder / name, target / name)
    fsync_dir(folder)
    return target
