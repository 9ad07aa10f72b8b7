"""Evaluation runs for the eval tests: held-out loss per layout, eval on vs off, compile
counters and bad input, on gloo ranks started by ``tests.helpers.run_spawned``.

The runs are the loop tests' tiny real-text runs (``tests.train._loop_scenarios``) with a
held-out split of ``FRACTION`` of the documents, evaluated every ``INTERVAL`` steps
(after steps 4, 8 and the last, 10).
"""

import hashlib
import sys
from pathlib import Path

import torch

from tests.helpers import guarded
from tests.train._loop_scenarios import LAYOUTS, overrides, refusal_recorder

# 2 of the 79 topics documents (76 pieces of at most 128 tokens, the tiny model's
# positions): 298 rows of 33 tokens, 38 global batches of 8 rows, the last one completed
# with rows that predict nothing.
FRACTION = 0.02
INTERVAL = 4
EVAL_STEPS = [4, 8, 10]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def state_digest(trainer) -> str:
    """SHA-256 of this rank's parameter shards and optimizer state, in order."""
    digest = hashlib.sha256()
    for module in trainer.modules:
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(_local(param.detach()).contiguous().numpy().tobytes())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    digest.update(_local(value).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _trainer(workdir: str, corpus: str, init: str, name: str, layout: dict, **extra):
    from d9d.train.config import load_train_config
    from d9d.train.loop import Trainer

    items = overrides(Path(corpus), Path(workdir) / name.replace(" ", "_"), **extra)
    items["model.init"] = init
    items.update(layout)
    return Trainer(load_train_config(None, items), log=lambda _m: None)


def _run(workdir, corpus, init, name, layout, evaluate: bool, **extra) -> dict:
    trainer = _trainer(
        workdir,
        corpus,
        init,
        name,
        layout,
        **{"eval.fraction": FRACTION, "eval.interval": INTERVAL, "eval.enabled": evaluate},
        **extra,
    )
    local_tokens = []
    modes = []
    if trainer.validator is not None:
        original = trainer.validator.run
        forward_only = trainer.schedule.eval

        def run(step):
            result = original(step)
            local_tokens.append(trainer.validator.last_local_tokens)
            return result

        def drawing_eval(batch):
            # A forward that draws random numbers, as a dropout layer would, and reads
            # the modules' mode.
            torch.rand(3)
            modes.append(all(not m.training for m in trainer.modules))
            return forward_only(batch)

        trainer.validator.run = run
        trainer.schedule.eval = drawing_eval
    history = trainer.run()
    return {
        "loss": [m.loss for m in history],
        "grad_norm": [m.grad_norm for m in history],
        "eval": [(e.step, e.eval_loss, e.eval_tokens) for e in trainer.eval_history],
        "local_eval_tokens": local_tokens,
        "digest": state_digest(trainer),
        "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
        "eval_mode_during_eval": modes and all(modes),
        "train_mode_after": all(m.training for module in trainer.modules for m in module.modules()),
        "dp_rank": trainer.ctx.dp_rank,
    }


def eval_layouts(workdir: str, corpus: str, init: str, names: list[str]) -> dict:
    """Each layout of ``names`` (all of this world size) with evaluation on and off."""
    results = {}
    for name in names:
        layout = LAYOUTS[name]
        results[name] = {
            "on": guarded(_run, workdir, corpus, init, f"{name} on", layout, True),
            "off": guarded(_run, workdir, corpus, init, f"{name} off", layout, False),
        }
    return results


def compiled_eval(workdir: str, corpus: str, init: str) -> dict:
    """``compile_sac`` with evaluation on (compile counters around each eval) and off."""
    from d9d.metrics.compile_stats import read_compile_stats, reset_compile_state

    def stats() -> dict:
        s = read_compile_stats()
        return {"graph_breaks": s.graph_breaks, "recompiles": s.recompiles, "graphs": s.graphs}

    reset_compile_state()
    trainer = _trainer(
        workdir,
        corpus,
        init,
        "compiled on",
        {},
        compile_preset="compile_sac",
        **{"eval.fraction": FRACTION, "eval.interval": INTERVAL},
    )
    around = []
    original = trainer.validator.run

    def run(step):
        before = stats()
        result = original(step)
        around.append({"step": step, "before": before, "after": stats()})
        return result

    trainer.validator.run = run
    history = trainer.run()
    on = {
        "loss": [m.loss for m in history],
        "eval": [(e.step, e.eval_loss) for e in trainer.eval_history],
        "digest": state_digest(trainer),
        "around": around,
        "final": stats(),
    }
    off_trainer = _trainer(
        workdir,
        corpus,
        init,
        "compiled off",
        {},
        compile_preset="compile_sac",
        **{"eval.fraction": FRACTION, "eval.enabled": False},
    )
    off_history = off_trainer.run()
    off = {"loss": [m.loss for m in off_history], "digest": state_digest(off_trainer)}
    return {"on": on, "off": off}


def bad_eval_inputs(workdir: str, corpus: str) -> dict:
    """Builds trainers from bad ``[eval]`` / ``[metrics]`` settings; returns each error."""
    from d9d.dataset.token_files import write_token_file

    base = overrides(Path(corpus), Path(workdir) / "bad_eval", **{"checkpoint.resume": False})
    attempt, results = refusal_recorder(base)

    attempt("small_heldout", **{"eval.fraction": 0.001})
    attempt("missing_paths", **{"eval.paths": [f"{workdir}/nope.bin"]})
    wide = write_token_file(Path(workdir) / "wide.bin", [[5, 400, 7] * 100], 257, 1000)
    attempt("heldout_vocab", **{"eval.paths": [str(wide)]})
    text = Path(workdir) / "valid.txt"
    text.write_text("text, but [data] reads token files")
    attempt("wrong_format", **{"eval.paths": [str(text)]})
    for sink, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        # As if the package were not installed: importing it raises ImportError.
        saved = sys.modules.get(module)
        sys.modules[module] = None
        try:
            attempt(f"missing_{sink}", **{f"metrics.{sink}": True})
        finally:
            if saved is None:
                sys.modules.pop(module, None)
            else:
                sys.modules[module] = saved
    return results


def eval_paths_runs(workdir: str, corpus: str) -> dict:
    """Held-out files of their own: token files, and text files tokenized like ``[data]``."""
    import json
    from pydoc_data.topics import topics

    from d9d.dataset.corpus import DocumentCorpus
    from d9d.dataset.token_files import open_token_file, write_token_file
    from d9d.dataset.tokenizers import ByteTokenizer
    from d9d.train.config import load_train_config
    from d9d.train.loop import Trainer

    tok = ByteTokenizer()
    names = sorted(topics)
    held_docs = [list(topics[name].encode()) for name in names[:6]]
    held = write_token_file(Path(workdir) / "held.bin", held_docs, tok.eos_id, tok.vocab_size)
    results = {}

    def run(name: str, **extra) -> dict:
        items = overrides(
            Path(corpus), Path(workdir) / name, steps=2, **{"checkpoint.resume": False, **extra}
        )
        trainer = Trainer(load_train_config(None, items), log=lambda _m: None)
        trainer.run()
        pieces = trainer.heldout.corpus
        (result,) = trainer.eval_history
        return {
            "step": result.step,
            "eval_tokens": result.eval_tokens,
            "documents": len(pieces),
            # Every next-token prediction of every held-out piece, once.
            "expected_tokens": int(sum(int(n) - 1 for n in pieces.doc_lengths)),
            "train_documents": len(trainer.data.corpus),
        }

    results["tokens"] = run("tokens_paths", **{"eval.paths": [str(held)]})
    results["tokens"]["file_documents"] = len(DocumentCorpus([open_token_file(held, None)]))
    text_dir = Path(workdir) / "text"
    text_dir.mkdir()
    for name in names[6:40]:
        (text_dir / f"{name}.txt").write_text(topics[name])
    valid = text_dir.parent / "valid.jsonl"
    valid.write_text("".join(json.dumps({"text": topics[n]}) + "\n" for n in names[:6]))
    results["text"] = run(
        "text_paths",
        **{
            "data.source": "text",
            "data.paths": [str(text_dir)],
            "eval.paths": [str(valid)],
        },
    )
    return results
