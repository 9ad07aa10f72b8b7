"""How a run starts: fresh, or resumed from a verified checkpoint under the run's rules.

In this order, every rank together, before the first step:

1. the checkpoint folder's lineage decides fresh start, plain resume, new branch or
   refusal (``d9d.checkpoint.lineage``);
2. the chosen checkpoint is verified against its manifest (``d9d.checkpoint.manifest``);
3. its config is compared with this run's (``d9d.train.resume_policy``): refused, or the
   allowed changes collected;
4. model, optimizer, scheduler (unless changes rebuild it), RNG and data cursor load;
   allowed changes are applied and logged;
5. the caller's last check (free space for the saves to come) runs;
6. only then is anything on disk changed: old checkpoints moved aside
   (``checkpoint.overwrite``), ``lineage.json`` written, ``metrics.jsonl`` cut back to
   the resumed step or switched to the new branch's history (``d9d.train.metrics_file``).

A refusal at any step leaves the folder as it was.
"""

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.checkpoint.training import CheckpointManager
from d9d.dataset.packed_batches import PackedBatches
from d9d.train import metrics_file
from d9d.train.config import TrainConfig
from d9d.train.resume_policy import apply_changes, check_resume


def start_or_resume(
    config: TrainConfig,
    checkpoints: CheckpointManager,
    *,
    modules: list[torch.nn.Module],
    optimizers: list[torch.optim.Optimizer],
    schedulers: list,
    data: PackedBatches,
    model_params: dict,
    metrics_path: Path,
    log: Callable[[str], None],
    check: Callable[[int, int], None] | None = None,
) -> int:
    """Starts the run or resumes it; returns the step it continues from.

    Args:
        config: This run's config.
        checkpoints: The run's checkpoint manager.
        modules: This rank's stage modules (filled from the checkpoint).
        optimizers: One optimizer per module.
        schedulers: One LR scheduler per optimizer, built from ``config``.
        data: The training batches (their cursor is restored).
        model_params: The model's parameters as JSON (an other model is refused).
        metrics_path: ``<output_dir>/metrics.jsonl``.
        log: Receives what was decided and done (rank 0).
        check: Called with the step and the number of checkpoints of the branch that
            continues, before anything on disk changes (it may refuse by raising).

    Raises:
        ValueError: For a resume the rules refuse (another run's or branch's
            checkpoints, a corrupted checkpoint, changed data or schedule settings).
    """
    ck = config.checkpoint
    resume_from = Path(ck.resume_from) if ck.resume_from else None
    if resume_from is not None and not resume_from.is_dir():
        raise ValueError(f"checkpoint.resume_from: {resume_from} does not exist")
    plan = checkpoints.plan(resume=ck.resume, resume_from=resume_from, overwrite=ck.overwrite)
    step = 0
    source_branch = None
    if plan.checkpoint is not None:
        path = plan.checkpoint
        started = time.perf_counter()
        manifest = checkpoints.verify(path)
        verify_seconds = time.perf_counter() - started
        state = checkpoints.read_train_state(path)
        changes = check_resume(
            state.get("extra", {}).get("config"), config, path=str(path), step=int(state["step"])
        )
        resumed = checkpoints.load(
            path,
            modules,
            optimizers,
            schedulers=() if changes else schedulers,
            model_params=model_params,
            verified=True,
        )
        data.load_state_dict(resumed.data_state)
        step = resumed.step
        source_branch = manifest.get("branch")
        size = sum(entry["size"] for entry in manifest["files"].values())
        log(
            f"resumed from {path} at step {step} (verified {len(manifest['files'])} files, "
            f"{size / 1e6:.1f} MB, in {verify_seconds:.2f} s)"
        )
        if changes:
            log(apply_changes(changes, config, optimizers, schedulers, step))
    if check is not None:
        own = 0
        if not plan.new_run:
            own = sum(f.branch == plan.lineage.live for f in checkpoints.found())
        check(step, own)
    checkpoints.begin(plan)
    if plan.note:
        log(plan.note)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if plan.new_run:
            metrics_file.move_aside(metrics_path, log)
        elif plan.previous_live is not None:
            on_old_history = source_branch is not None and plan.lineage.on_history(
                plan.previous_live, source_branch, step
            )
            source = (
                metrics_path
                if on_old_history
                else metrics_path.with_name(f"{metrics_path.stem}.{source_branch}.jsonl")
            )
            metrics_file.switch_branch(metrics_path, plan.previous_live, source, step, log)
        else:
            metrics_file.keep_until(metrics_path, step, log)
    return step
