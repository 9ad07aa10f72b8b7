"""What checkpoints cost the training loop: integrity, sync vs async saves, HF export memory.

Usage::

    python profiling/checkpoint_costs.py                  # cpu-small, saves every 4 steps
    python profiling/checkpoint_costs.py --steps 24 --interval 4 --out /tmp/ckpt_costs
    torchrun --nproc-per-node 2 profiling/checkpoint_costs.py --export CHECKPOINT

The first form trains the same run twice in one process (synchronous saves, then
``checkpoint.async_save``) and prints a Markdown table: checkpoint size, time a save blocks
training, time until it is complete, time the CRC-32 manifest takes at save, time
verification takes at load (against the DCP load itself), and the step time lost per save:
the blocking time plus what the steps overlapping the background write took beyond the
run's median step without a save (both measured in the same run, so that a shared,
noisy machine slows both alike). ``--export`` measures the peak resident memory each
rank adds while exporting a training checkpoint as an HF folder (Linux: the peak is reset
through ``/proc/self/clear_refs`` first, then read from ``VmHWM``).
"""

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path


def _settings(args, out: Path, **extra) -> dict:
    return {
        "steps": args.steps,
        "output_dir": str(out),
        "peak_tflops": 1.0,
        "num_threads": args.num_threads,
        "model.preset": args.preset,
        "model.vocab_size": args.vocab_size,
        "data.seq_len": args.seq_len,
        "data.global_batch_size": args.batch_size,
        "data.max_documents": 20_000,
        "data.cache_dir": str(args.cache),
        "lr.warmup_steps": 2,
        "checkpoint.save_final": False,
        "checkpoint.export_hf": False,
        "checkpoint.keep_last": 2,
        **extra,
    }


def _train(settings: dict) -> dict:
    # One run with timestamps: each step's [start, end), each save's blocking span and
    # completion (the manager's callback, from the background thread for async saves).
    from d9d.train.config import load_train_config
    from d9d.train.loop import Trainer

    trainer = Trainer(load_train_config(None, settings), log=lambda _m: None)
    steps, saves, done = [], [], {}
    train_step, save = trainer.train_step, trainer.save_checkpoint
    saved = trainer.checkpoints.on_complete

    def timed_step():
        started = time.perf_counter()
        metrics = train_step()
        steps.append((started, time.perf_counter()))
        return metrics

    def timed_save():
        started = time.perf_counter()
        path = save()
        saves.append((trainer.step, started, time.perf_counter()))
        return path

    def timed_saved(step, path, seconds, blocking):
        done[step] = (time.perf_counter(), seconds, blocking)
        saved(step, path, seconds, blocking)

    trainer.train_step, trainer.save_checkpoint = timed_step, timed_save
    trainer.checkpoints.on_complete = timed_saved
    trainer.run()
    return {"trainer": trainer, "steps": steps, "saves": saves, "done": done}


def _save_costs(run: dict) -> tuple[float, list[float]]:
    # Steps overlapping a background write (or right after a save) against the others.
    steps, saves, done = run["steps"], run["saves"], run["done"]
    spans = [(end, done[step][0]) for step, _, end in saves]
    overlapped = [any(s < b and e > a for a, b in spans) for s, e in steps]
    clean = statistics.median(
        e - s for (s, e), hit in zip(steps[1:], overlapped[1:], strict=True) if not hit
    )
    costs = []
    for step, start, end in saves:
        a, b = end, done[step][0]
        slower = sum(e - s - clean for s, e in steps if s < b and e > a)
        costs.append(end - start + max(0.0, slower))
    return clean, costs


def _costs(args) -> None:
    from d9d.checkpoint.manifest import describe_files, list_files

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = []
    for mode in ("sync", "async"):
        settings = _settings(
            args,
            root / mode,
            **{"checkpoint.interval": args.interval, "checkpoint.async_save": mode == "async"},
        )
        run = _train(settings)
        trainer = run["trainer"]
        path = trainer.checkpoints.latest()
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        started = time.perf_counter()
        describe_files(path, list_files(path))
        checksum = time.perf_counter() - started
        started = time.perf_counter()
        trainer.checkpoints.verify(path)
        verify = time.perf_counter() - started
        started = time.perf_counter()
        trainer.checkpoints.load(path, trainer.modules, trainer.optimizers, verified=True)
        load = time.perf_counter() - started
        clean, costs = _save_costs(run)
        rows.append(
            {
                "mode": mode,
                "saves": len(costs),
                "size_mb": size / 1e6,
                "blocking_s": statistics.median(b for _, _, b in run["done"].values()),
                "write_s": statistics.median(s for _, s, _ in run["done"].values()),
                "checksum_s": checksum,
                "verify_s": verify,
                "load_s": load,
                "per_save_s": statistics.median(costs),
                "median_step_s": clean,
            }
        )
        del trainer, run
    print(
        "| saves | checkpoint | blocks training | complete after | CRC-32 manifest at save | "
        "verify at load | DCP load | step time lost per save | step without a save |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['mode']} ({r['saves']}) | {r['size_mb']:.0f} MB | {r['blocking_s']:.3f} s | "
            f"{r['write_s']:.3f} s | {r['checksum_s']:.3f} s | {r['verify_s']:.3f} s | "
            f"{r['load_s']:.3f} s | {r['per_save_s']:.3f} s | {r['median_step_s']:.3f} s |"
        )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _export(args) -> None:
    import torch.distributed as dist

    from d9d.checkpoint.hf_export import export_hf_from_checkpoint
    from d9d.train.config import load_train_config

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = load_train_config(None, _settings(args, Path(args.out)))
    params = config.model.parameters(args.seq_len, 258, True)
    folder = Path(args.out) / "hf"
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    export_hf_from_checkpoint(params, args.export, folder)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, (rank, before, peak, seconds))
    if rank == 0:
        for r, b, p, s in results:
            print(
                f"rank {r}: RSS before {b / 1024:.0f} MiB, peak {p / 1024:.0f} MiB, "
                f"added {(p - b) / 1024:.0f} MiB, {s:.2f} s"
            )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Runs the measurement; prints its table."""
    parser = argparse.ArgumentParser(prog="profiling/checkpoint_costs.py", description=__doc__)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--out", default="/tmp/d9d_checkpoint_costs")
    parser.add_argument("--cache", default="/tmp/d9d_checkpoint_costs_cache")
    parser.add_argument("--export", metavar="CHECKPOINT", help="measure the HF export instead")
    args = parser.parse_args(argv)
    if args.export:
        _export(args)
    else:
        _costs(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
