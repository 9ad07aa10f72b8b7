"""Training runs for the loop tests: a small real corpus, one tiny config, spawned layouts.

The corpus is the byte-level tokenization of the pydoc topics (the language reference's
prose, shipped with Python). Spawned functions run ``d9d.train.loop.Trainer`` in-process
on gloo ranks started by ``tests.helpers.run_spawned``.
"""

from pathlib import Path

from d9d.dataset.token_files import write_token_file
from d9d.dataset.tokenizers import ByteTokenizer
from d9d.train.config import load_train_config

STEPS = 10
LAYOUTS = {
    "one process": {},
    "dp_shard=2": {"parallel.data_parallel_shard": 2},
    "pp=2 (1f1b)": {"parallel.pipeline_parallel": 2, "parallel.pipeline_schedule": "1f1b"},
    "pp=2 x dp_shard=2": {"parallel.pipeline_parallel": 2, "parallel.data_parallel_shard": 2},
    "tp=2": {"parallel.tensor_parallel": 2},
    # dp x tp: FSDP2 shards the TP-split weights with strided shards (the norm must still
    # sum them over the data-parallel ranks).
    "dp_shard=2 x tp=2": {"parallel.data_parallel_shard": 2, "parallel.tensor_parallel": 2},
    "dp_replicate=2 x tp=2": {
        "parallel.data_parallel_replicate": 2,
        "parallel.tensor_parallel": 2,
    },
    # All three at once (8 ranks, the most this suite spawns): the norm sums strided shards
    # over dp, TP shards over tp and the stages' parts over pp.
    "pp=2 x dp_shard=2 x tp=2": {
        "parallel.pipeline_parallel": 2,
        "parallel.data_parallel_shard": 2,
        "parallel.tensor_parallel": 2,
    },
    "HSDP 2x2 x tp=2": {
        "parallel.data_parallel_replicate": 2,
        "parallel.data_parallel_shard": 2,
        "parallel.tensor_parallel": 2,
    },
    # Each CP rank trains on a head-tail share of every packed row's tokens.
    "cp=2": {"parallel.context_parallel": 2},
    "pp=2 x cp=2": {"parallel.pipeline_parallel": 2, "parallel.context_parallel": 2},
}

_DEGREES = (
    "parallel.pipeline_parallel",
    "parallel.data_parallel_replicate",
    "parallel.data_parallel_shard",
    "parallel.tensor_parallel",
    "parallel.context_parallel",
    "parallel.context_parallel_replicate",
)


def world_size(layout: dict) -> int:
    """The number of ranks a layout of ``LAYOUTS`` runs on."""
    world = 1
    for key in _DEGREES:
        world *= layout.get(key, 1)
    return world


def write_corpus(folder: str | Path) -> Path:
    """The pydoc topics as a byte-level token file in ``folder``."""
    from pydoc_data.topics import topics

    tok = ByteTokenizer()
    docs = [list(topics[name].encode()) for name in sorted(topics)]
    return write_token_file(Path(folder) / "topics.bin", docs, tok.eos_id, tok.vocab_size)


def write_hf_init(folder: str | Path, corpus: Path) -> Path:
    """An HF folder holding a randomly initialised model of the test shape.

    Every layout starts from it, so their first losses agree whatever each layout's own
    initialisation would do with sharded parameters.
    """
    import torch

    from d9d.module.model.qwen3_dense.hf_io import save_hf_checkpoint
    from d9d.module.model.qwen3_dense.model import whole_model

    config = load_train_config(None, overrides(corpus, Path(folder) / "unused"))
    params = config.model.parameters(config.data.seq_len, ByteTokenizer().vocab_size, True)
    torch.manual_seed(0)
    model = whole_model(params)
    model.reset_parameters()
    save_hf_checkpoint(model, Path(folder) / "hf_init")
    return Path(folder) / "hf_init"


def overrides(corpus: Path, output_dir: Path, **extra) -> dict:
    """The dotted-key settings of the tiny test run (fp32, eager, clipping active)."""
    items = {
        "steps": STEPS,
        "seed": 3,
        "output_dir": str(output_dir),
        "num_threads": 1,
        "peak_tflops": 1.0,  # no GEMM peak measurement in tests
        "mixed_precision": "fp32",  # the layouts must agree to fp32 rounding
        "model.preset": "tiny",
        "model.num_hidden_layers": 2,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_attention_heads": 2,
        "model.num_key_value_heads": 2,  # divisible by tensor_parallel=2
        "model.head_dim": 16,
        "data.source": "tokens",
        "data.paths": [str(corpus)],
        "data.seq_len": 32,
        "data.global_batch_size": 8,
        "optimizer.lr": 3e-3,
        "lr.warmup_steps": 3,
        # Below the norms seen (about 1-3): every step is clipped.
        "clip.max_norm": 0.5,
        "checkpoint.save_final": False,
        "checkpoint.export_hf": False,
        **extra,
    }
    return items


def refusal_recorder(base: dict):
    """``attempt(name, **settings)`` builds a trainer from ``base`` plus ``settings``.

    Returns:
        ``attempt`` and the dict it fills: the ``ValueError`` message per name, or
        ``None`` where the trainer was built.
    """
    from d9d.train.loop import Trainer

    results: dict[str, str | None] = {}

    def attempt(name: str, **extra) -> None:
        try:
            Trainer(load_train_config(None, {**base, **extra}), log=lambda _m: None)
        except ValueError as err:
            results[name] = str(err)
        else:
            results[name] = None

    return attempt, results


def set_items(settings: dict) -> list[str]:
    """The same settings as ``python -m d9d.train --set`` items (TOML values)."""

    def toml(value) -> str:
        if isinstance(value, str):
            return f'"{value}"'
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return "[" + ", ".join(toml(v) for v in value) + "]"
        return repr(value)

    return [f"{key}={toml(value)}" for key, value in settings.items()]


def train_layouts(workdir: str, corpus: str, init: str, names: list[str]) -> dict:
    """Runs each layout of ``names`` (all of this world size) for ``STEPS`` steps."""
    from d9d.train.loop import Trainer

    results = {}
    for name in names:
        items = overrides(Path(corpus), Path(workdir) / name.replace(" ", "_"))
        items["model.init"] = str(init)
        items.update(LAYOUTS[name])
        trainer = Trainer(load_train_config(None, items), log=lambda _m: None)
        history = trainer.run()
        results[name] = {
            "loss": [m.loss for m in history],
            "grad_norm": [m.grad_norm for m in history],
            "lr": [m.lr for m in history],
        }
    return results


def bad_inputs(workdir: str, corpus: str) -> dict:
    """Builds trainers from bad configs; returns each one's error message (or None)."""
    import shutil

    from d9d.train.loop import Trainer

    base = overrides(Path(corpus), Path(workdir) / "bad")
    attempt, results = refusal_recorder(base)

    attempt("small_corpus", **{"data.global_batch_size": 100000})
    attempt("vocab", **{"model.vocab_size": 100})
    attempt("missing_file", **{"data.paths": [f"{workdir}/nope.bin"]})
    attempt("microbatches", **{"parallel.n_microbatches": 3})
    attempt("layout", **{"parallel.data_parallel_shard": 2})
    attempt("context_parallel_seq", **{"parallel.context_parallel": 2, "data.seq_len": 30})
    # A checkpoint of another model in the run's folder.
    good = Trainer(load_train_config(None, base), log=lambda _m: None)
    good.save_checkpoint()
    # The HF export of that model holds the same weights.
    exported = good.export_hf(Path(workdir) / "hf_export")
    reloaded = {}
    import safetensors.torch

    for file in exported.glob("*.safetensors"):
        reloaded.update(safetensors.torch.load_file(file))
    own = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in good.modules[0].state_dict().items()
    }
    results["export_matches"] = all(
        bool(
            (
                reloaded[
                    k.replace("embed_tokens.token_embedding.text", "embed_tokens").replace(
                        "lm_head.lm_head.text", "lm_head"
                    )
                ]
                == v
            ).all()
        )
        for k, v in own.items()
    ) and len(reloaded) == len(own)
    attempt("other_model", **{"model.hidden_size": 64})
    results["nonfinite"] = _nonfinite_run(base)
    # A corrupted latest checkpoint names itself and the previous one.
    good.step = 1
    good.save_checkpoint()
    latest = Path(workdir) / "bad" / "checkpoints" / "step-1"
    for shard in latest.glob("*.distcp"):
        shard.write_bytes(b"")
    attempt("corrupted")
    shutil.rmtree(Path(workdir) / "bad")
    return results


def _nonfinite_run(base: dict) -> dict:
    # Poisoned gradients: every step's norm is NaN, so every optimizer step is skipped
    # and the run stops after clip.max_consecutive_nonfinite of them.
    import torch

    from d9d.train.loop import Trainer

    items = {
        **base,
        "output_dir": str(Path(base["output_dir"]).with_name("nonfinite")),
        "clip.max_consecutive_nonfinite": 2,
        "checkpoint.resume": False,
    }
    trainer = Trainer(load_train_config(None, items), log=lambda _m: None)
    original = trainer.schedule.step

    def poisoned(batch):
        result = original(batch)
        for param in trainer.stages.parameters():
            param.grad.fill_(float("nan"))
        return result

    trainer.schedule.step = poisoned
    before = [p.detach().clone() for p in trainer.stages.parameters()]
    try:
        trainer.run()
        message = None
    except RuntimeError as err:
        message = str(err)
    unchanged = all(
        torch.equal(a, b.detach()) for a, b in zip(before, trainer.stages.parameters(), strict=True)
    )
    return {"message": message, "step": trainer.step, "unchanged": unchanged}
