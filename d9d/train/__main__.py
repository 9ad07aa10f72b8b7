"""``python -m d9d.train [--config FILE.toml] [--set key=value ...] [--plot]``.

Without a config it trains a small byte-level model on the CPU on the Python standard
library's own sources. Under ``torchrun`` the same command runs any supported layout.
"""

import argparse
import sys

from d9d.train.config import TrainConfig, config_reference, load_train_config

_OUTPUTS = """\
outputs (under output_dir, default {output_dir}; runs/ is ignored by git):
  metrics.jsonl          one JSON line per logged step (loss, grad norm, lr, tokens/s, MFU)
  checkpoints.jsonl      the time of each checkpoint save
  checkpoints/step-N/    checkpoints: model, optimizer, LR scheduler, data cursor, RNG, step
  token_cache/           the tokenized corpus (data.cache_dir), reused by later runs
  hf/                    the trained model as an HF folder (checkpoint.export_hf)
  curves.png             loss, LR and grad-norm curves (--plot)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d9d.train",
        description="Train a Qwen3 Dense causal LM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (TOML, every one optional; --set KEY=VALUE overrides one; "
        "defaults shown):\n"
        + config_reference()
        + "\n\n"
        + _OUTPUTS.format(output_dir=TrainConfig().output_dir),
    )
    parser.add_argument("--config", help="training config (TOML); defaults: the built-in run")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. parallel.pipeline_parallel=2); repeatable",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="at the end, draw loss, held-out loss, LR and tokens/s into OUTPUT_DIR/curves.png",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        # Fail before training, not after it.
        from d9d.train.plot import require_matplotlib

        if not config.metrics.jsonl:
            print("error: --plot reads metrics.jsonl: set metrics.jsonl=true", file=sys.stderr)
            return 2
        try:
            require_matplotlib()
        except ImportError as err:
            print(f"error: --plot: {err}", file=sys.stderr)
            return 2
    from d9d.checkpoint.training import CheckpointError
    from d9d.train.loop import Trainer
    from d9d.train.stop import RunStopped

    try:
        trainer = Trainer(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if config.checkpoint.export_hf:
        try:
            trainer.export_hf()
        except (CheckpointError, ValueError) as err:
            print(f"error: HF export: {err}", file=sys.stderr)
            return 2
    if args.plot and trainer.is_main:
        from d9d.train.plot import plot_metrics

        print(f"wrote {plot_metrics(trainer.output_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
