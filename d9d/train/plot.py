"""Loss, learning-rate and gradient-norm curves of a run (needs ``matplotlib``)."""

import json
from pathlib import Path

from d9d.train.loop import METRICS_FILE


def require_matplotlib() -> None:
    """Raises a clear ``ImportError`` if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'd9d[plot]'") from err


def plot_metrics(output_dir: str | Path) -> Path:
    """Writes ``<output_dir>/curves.png`` from ``metrics.jsonl``; returns its path."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    rows = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, key, label in zip(
        axes, ("loss", "lr", "grad_norm"), ("loss", "learning rate", "grad norm"), strict=True
    ):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = output_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
