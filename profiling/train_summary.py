"""Summarises ``python -m d9d.train`` runs from their output folders, as a Markdown table.

Usage: ``python profiling/train_summary.py OUTPUT_DIR [OUTPUT_DIR ...]``

Per run: the loss of the first and last logged steps, median tokens/s and MFU over the
steps after the first two (warm-up: allocator, first all-gathers), the loop's own
overhead (data, clipping, logging) as a share of the median step, the checkpoint
save times recorded in ``checkpoints.jsonl``, and with ``[eval]`` on the last held-out
loss and the median evaluation time (also in median training steps).
"""

import json
import statistics
import sys
from pathlib import Path


def summarise(folder: Path) -> dict:
    """The numbers of one run folder."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    steady = rows[2:] or rows
    saves_file = folder / "checkpoints.jsonl"
    saves = (
        [json.loads(line)["seconds"] for line in saves_file.read_text().splitlines()]
        if saves_file.is_file()
        else []
    )
    step = statistics.median(r["step_seconds"] for r in steady)
    return {
        "run": folder.name,
        "steps": rows[-1]["step"],
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_seconds": step,
        "overhead_share": statistics.median(r["overhead_seconds"] for r in steady) / step,
        "save_seconds": max(saves) if saves else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_seconds": statistics.median(r["eval_seconds"] for r in evals) if evals else None,
    }


def main(argv: list[str]) -> None:
    """Prints the table of the folders in ``argv``."""
    print(
        "| run | steps | loss first -> last | tokens/s | MFU | step s | loop overhead | save s "
        "| eval loss (last) | eval s (in steps) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for folder in argv:
        s = summarise(Path(folder))
        save = f"{s['save_seconds']:.2f}" if s["save_seconds"] is not None else "-"
        eval_loss = f"{s['eval_loss']:.3f}" if s["eval_loss"] is not None else "-"
        eval_seconds = "-"
        if s["eval_seconds"] is not None:
            in_steps = s["eval_seconds"] / s["step_seconds"]
            eval_seconds = f"{s['eval_seconds']:.2f} ({in_steps:.0f})"
        print(
            f"| {s['run']} | {s['steps']} | {s['loss_first']:.3f} -> {s['loss_last']:.3f} | "
            f"{s['tokens_per_second']:,.0f} | {100 * s['mfu']:.1f}% | {s['step_seconds']:.3f} | "
            f"{100 * s['overhead_share']:.2f}% | {save} | {eval_loss} | {eval_seconds} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
