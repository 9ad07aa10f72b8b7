"""Curves of a run from its ``metrics.jsonl``: training and held-out loss, LR, throughput.

``python -m d9d.train.plot OUTPUT_DIR [--out FILE.png]`` (or ``python -m d9d.train
--plot``, at the end of training) writes ``OUTPUT_DIR/curves.png``. Needs matplotlib:
``pip install 'd9d[plot]'``.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from d9d.train.metric_sinks import METRICS_FILE

PLOT_FILE = "curves.png"


def require_matplotlib() -> None:
    """Raises a clear ``ImportError`` if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'd9d[plot]'") from err


def read_metrics(output_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The step records and the eval records of ``<output_dir>/metrics.jsonl``.

    Raises:
        ValueError: If the file is missing or holds no step record.
    """
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist (is metrics.jsonl=true?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not steps:
        raise ValueError(f"{path} holds no step record")
    return steps, evals


def _pyplot():
    require_matplotlib()
    # The first import on a machine builds a font cache and says so through logging;
    # that notice is not something a user of the plot has to act on.
    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    finally:
        font_log.setLevel(level)
    return plt


def plot_metrics(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws loss (training and held-out), learning rate and tokens/s against steps.

    Args:
        output_dir: The run's folder (its ``metrics.jsonl`` is read).
        out: The PNG to write (``None``: ``<output_dir>/curves.png``).

    Returns:
        The path written.
    """
    steps, evals = read_metrics(output_dir)
    plt = _pyplot()
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    loss_ax, lr_ax, speed_ax = axes
    loss_ax.plot(x, [r["loss"] for r in steps], label="training loss", linewidth=1)
    if evals:
        loss_ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="held-out loss",
            markersize=4,
        )
    loss_ax.set_ylabel("loss (NLL)")
    loss_ax.legend()
    lr_ax.plot(x, [r["lr"] for r in steps])
    lr_ax.set_ylabel("learning rate")
    speed_ax.plot(x, [r["tokens_per_second"] for r in steps], linewidth=1)
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(output_dir) / PLOT_FILE
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m d9d.train.plot OUTPUT_DIR [--out FILE.png]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m d9d.train.plot",
        description="Plot loss, held-out loss, learning rate and tokens/s of a run.",
    )
    parser.add_argument("output_dir", help="the run's folder (holding metrics.jsonl)")
    parser.add_argument("--out", help=f"the PNG to write (default: OUTPUT_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.output_dir, args.out)
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
