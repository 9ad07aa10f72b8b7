"""Where the training loop's metrics go: ``metrics.jsonl``, TensorBoard, Weights & Biases.

Every sink takes the same records: the JSON dicts of a logged step (``"step"``,
``"loss"``, ``"grad_norm"``, ``"lr"``, ``"tokens_per_second"``, ``"mfu"``,
``"memory_bytes"``, ``"step_seconds"``, ...) and of an evaluation (``"step"``,
``"eval_loss"``, ``"eval_perplexity"``, ``"eval_tokens"``, ``"eval_seconds"``). Only
rank 0 opens sinks; :func:`check_metric_sinks` runs on every rank before the first step,
so a missing package stops every rank with the same message instead of one rank
failing while the others wait in a collective.

TensorBoard and W&B get scalars named ``train/<name>`` and ``eval/<name>`` (memory in
GiB). W&B runs offline unless ``WANDB_MODE`` says otherwise: nothing is sent anywhere
until the user runs ``wandb sync <output_dir>/wandb/offline-run-...``.
"""

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # importing the config pulls in torch; ``d9d.train.plot`` needs neither
    from d9d.train.config import MetricsSection

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"

# JSON name -> (scalar name, scale). What each record kind plots, in the order shown.
_STEP_SCALARS = {
    "loss": ("train/loss", 1.0),
    "grad_norm": ("train/grad_norm", 1.0),
    "lr": ("train/lr", 1.0),
    "tokens_per_second": ("train/tokens_per_second", 1.0),
    "mfu": ("train/mfu", 1.0),
    "memory_bytes": ("train/memory_gib", 1.0 / 2**30),
    "step_seconds": ("train/step_seconds", 1.0),
}
_EVAL_SCALARS = {
    "eval_loss": ("eval/loss", 1.0),
    "eval_perplexity": ("eval/perplexity", 1.0),
    "eval_tokens": ("eval/tokens", 1.0),
    "eval_seconds": ("eval/seconds", 1.0),
}

# Sink -> (module the sink imports, the package that provides it, pip extra).
_PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The named scalars of a step or eval record (``train/loss``, ``eval/loss``, ...)."""
    table = _EVAL_SCALARS if "eval_loss" in record else _STEP_SCALARS
    return {
        name: float(record[key]) * scale
        for key, (name, scale) in table.items()
        if record.get(key) is not None
    }


class MetricSink(Protocol):
    """Receives every record of rank 0, in order."""

    def write(self, record: dict[str, Any]) -> None:
        """Records one step or evaluation."""
        ...

    def close(self) -> None:
        """Flushes and releases the sink (the run is over)."""
        ...


class JsonlSink:
    """Appends each record as one JSON line to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: Path):
        """Writes to ``output_dir / "metrics.jsonl"`` (appending: a resumed run continues it)."""
        self.path = Path(output_dir) / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record``."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Nothing to release (every line is written when it is recorded)."""


class TensorBoardSink:
    """TensorBoard event files under ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: Path, resumed_step: int = 0):
        """Opens an event file.

        Args:
            output_dir: The run's folder.
            resumed_step: The step a resumed run restarts after: events of later steps
                from earlier event files (the crashed run's) are hidden by TensorBoard, so
                the steps that run again appear once.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(output_dir) / TENSORBOARD_FOLDER
        purge = resumed_step + 1 if resumed_step else None
        self._writer = SummaryWriter(str(self.folder), flush_secs=10, purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """Adds the record's scalars at its step."""
        step = int(record["step"])
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, step)
        if "eval_loss" in record:
            # Evaluations are rare and worth seeing at once.
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._writer.close()


class WandbSink:
    """A Weights & Biases run under ``<output_dir>/wandb``, offline by default."""

    def __init__(self, output_dir: Path, config: dict[str, Any], log=None):
        """Starts the run (silently; one status line goes to ``log``).

        Args:
            output_dir: The run's folder (the run is named after it).
            config: The training config, stored with the run.
            log: Receives one line saying where the run is (``None``: nothing).
        """
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        output_dir = Path(output_dir)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "d9d"),
            name=output_dir.resolve().name,
            dir=str(output_dir),
            mode=mode,
            config=config,
            # wandb's own banner and console capture would interleave with the loop's
            # lines; the status line below says what a user needs.
            settings=wandb.Settings(silent=True, console="off"),
        )
        if log is not None:
            where = Path(self._run.dir).parent
            if mode == "offline":
                log(f"wandb: offline run in {where} (upload with: wandb sync {where})")
            else:
                log(f"wandb: {mode} run {self._run.url or where}")

    def write(self, record: dict[str, Any]) -> None:
        """Logs the record's scalars at its step."""
        self._run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        """Finishes the run."""
        self._run.finish()


def check_metric_sinks(section: "MetricsSection") -> None:
    """Refuses sinks whose package is missing (call on every rank, before the first step).

    Raises:
        ValueError: Naming the ``metrics.<sink>`` key and the install command.
    """
    for sink, (module, package, extra) in _PACKAGES.items():
        if not getattr(section, sink):
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"metrics.{sink}=true needs the '{package}' package: pip install "
                f"'d9d[{extra}]' (or set metrics.{sink}=false)"
            ) from err


def open_metric_sinks(
    section: "MetricsSection",
    output_dir: Path,
    *,
    resumed_step: int = 0,
    config: dict[str, Any] | None = None,
    log=None,
) -> list[MetricSink]:
    """The sinks ``section`` turns on (rank 0 only).

    Args:
        section: ``[metrics]``.
        output_dir: The run's folder.
        resumed_step: The checkpoint step the run resumed from (0: a fresh run).
        config: The training config as JSON (stored with a W&B run).
        log: Status lines of the sinks.
    """
    check_metric_sinks(section)
    sinks: list[MetricSink] = []
    if section.jsonl:
        sinks.append(JsonlSink(output_dir))
    if section.tensorboard:
        sinks.append(TensorBoardSink(output_dir, resumed_step))
    if section.wandb:
        sinks.append(WandbSink(output_dir, config or {}, log))
    return sinks
