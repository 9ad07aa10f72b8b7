"""The held-out loss: the same under every layout, and it never changes training.

Every layout of the loop tests trains 10 steps with an evaluation after steps 4, 8 and
10, and again with the same held-out split but evaluation off (``eval.enabled = false``):
the training losses and the final parameters and optimizer state must be bit-identical,
and the held-out losses must agree across layouts. ``compile_sac`` adds one cached
inference graph at the first evaluation and never recompiles the training graph.
"""

import re

import pytest

from d9d.train.__main__ import main
from d9d.train.config import load_train_config
from tests.helpers import run_spawned
from tests.train._eval_scenarios import EVAL_STEPS
from tests.train._loop_scenarios import LAYOUTS, STEPS, world_size, write_corpus, write_hf_init

# fp32; layouts differ in summation order only (over ranks, microbatches and the AdamW
# steps before each evaluation), as in test_loop_layouts.
RTOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(folder)
    return corpus, write_hf_init(folder, corpus)


@pytest.fixture(scope="module")
def runs(files) -> dict:
    corpus, init = files
    by_world: dict[int, list[str]] = {}
    for name, layout in LAYOUTS.items():
        by_world.setdefault(world_size(layout), []).append(name)
    results = {}
    for world, names in sorted(by_world.items()):
        per_rank = run_spawned(
            world,
            "tests.train._eval_scenarios:eval_layouts",
            timeout_s=420,
            corpus=str(corpus),
            init=str(init),
            names=names,
        )
        for name in names:
            results[name] = [rank[name] for rank in per_rank]
    return results


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("error")
    return result


def test_evaluates_after_each_interval_and_the_last_step(runs):
    (rank,) = runs["one process"]
    on = _ok(rank["on"])
    assert [step for step, _, _ in on["eval"]] == EVAL_STEPS
    losses = [loss for _, loss, _ in on["eval"]]
    # The held-out loss of a model learning real text falls (from about ln(258) = 5.55).
    assert losses[-1] < losses[0] < 6.0
    tokens = {count for _, _, count in on["eval"]}
    assert len(tokens) == 1, "every evaluation covers the same held-out tokens"
    assert _ok(rank["off"])["eval"] == []


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eval_never_changes_training(runs, name):
    for rank in runs[name]:
        on, off = _ok(rank["on"]), _ok(rank["off"])
        assert len(on["loss"]) == STEPS
        assert on["loss"] == off["loss"], "training losses must be bit-identical"
        assert on["grad_norm"] == off["grad_norm"]
        assert on["digest"] == off["digest"], "final parameters / optimizer state differ"
        # The evaluations drew random numbers; training's RNG stream must not notice.
        assert on["rng"] == off["rng"]
        assert on["eval_mode_during_eval"] is True
        assert on["train_mode_after"] and off["train_mode_after"]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "one process"])
def test_heldout_loss_is_the_same_under_every_layout(runs, name):
    (ref,) = runs["one process"]
    ref_eval = _ok(ref["on"])["eval"]
    for rank in runs[name]:
        got = _ok(rank["on"])["eval"]
        assert [(s, t) for s, _, t in got] == [(s, t) for s, _, t in ref_eval]
        assert [loss for _, loss, _ in got] == pytest.approx(
            [loss for _, loss, _ in ref_eval], rel=RTOL
        )


@pytest.mark.parametrize("name", ["dp_shard=2", "pp=2 x dp_shard=2"])
def test_each_data_parallel_rank_evaluates_its_own_share(runs, name):
    ranks = [_ok(rank["on"]) for rank in runs[name]]
    total = ranks[0]["eval"][0][2]
    by_dp: dict[int, int] = {}
    for rank in ranks:
        # Ranks of one data-parallel slice (pipeline stages) read the same rows.
        by_dp.setdefault(rank["dp_rank"], rank["local_eval_tokens"][0])
        assert by_dp[rank["dp_rank"]] == rank["local_eval_tokens"][0]
    assert len(by_dp) == 2
    assert sum(by_dp.values()) == total
    assert all(0 < share < total for share in by_dp.values())


@pytest.fixture(scope="module")
def compiled(files) -> dict:
    corpus, init = files
    (result,) = run_spawned(
        1,
        "tests.train._eval_scenarios:compiled_eval",
        timeout_s=420,
        corpus=str(corpus),
        init=str(init),
    )
    return result


def test_compiled_layers_keep_their_training_graph(compiled):
    on, off = compiled["on"], compiled["off"]
    first, *later = on["around"]
    assert [a["step"] for a in on["around"]] == EVAL_STEPS
    assert first["before"]["graph_breaks"] == 0 and on["final"]["graph_breaks"] == 0
    # The first evaluation compiles the inference graphs (no_grad, eval mode) next to the
    # training graph: one per attention path its batches take (rows packing several
    # documents use the document mask, the held-out set's long-document rows the plain
    # causal path; this held-out set has both) ...
    new_graphs = first["after"]["graphs"] - first["before"]["graphs"]
    assert new_graphs in (1, 2)
    assert first["after"]["recompiles"] - first["before"]["recompiles"] == new_graphs
    # ... and from then on nothing compiles: the training steps between evaluations hit
    # the cached training graph, later evaluations the cached inference graph.
    for around in later:
        assert around["before"] == first["after"], around
        assert around["after"] == first["after"], around
    assert on["final"] == first["after"]
    assert on["loss"] == off["loss"]
    assert on["digest"] == off["digest"]


def test_compiled_heldout_loss_matches_eager(compiled, runs):
    (ref,) = runs["one process"]
    eager = [loss for _, loss, _ in _ok(ref["on"])["eval"]]
    got = [loss for _, loss in compiled["on"]["eval"]]
    # Compiled kernels reassociate fp32 sums: close to eager, not equal.
    assert got == pytest.approx(eager, rel=1e-4)


@pytest.fixture(scope="module")
def bad(files) -> dict:
    corpus, _ = files
    (result,) = run_spawned(
        1, "tests.train._eval_scenarios:bad_eval_inputs", timeout_s=180, corpus=str(corpus)
    )
    return result


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        (
            "small_heldout",
            r"held-out set \(eval\.fraction=0\.001\) is smaller than one batch: 0 documents",
        ),
        ("missing_paths", r"eval\.paths: .*nope\.bin does not exist"),
        ("heldout_vocab", r"eval\.paths: .*token id 400, outside the model's vocabulary"),
        (
            "wrong_format",
            r"eval\.paths: .*valid\.txt: token files must end in \('\.npy', '\.bin'\)",
        ),
        (
            "missing_tensorboard",
            r"metrics\.tensorboard=true needs the 'tensorboard' package: "
            r"pip install 'd9d\[tensorboard\]'",
        ),
        (
            "missing_wandb",
            r"metrics\.wandb=true needs the 'wandb' package: pip install 'd9d\[wandb\]'",
        ),
    ],
)
def test_bad_eval_input_refused_before_the_first_step(bad, name, pattern):
    assert bad[name] is not None, f"{name} was accepted"
    assert re.search(pattern, bad[name]), bad[name]


@pytest.mark.parametrize(
    ("items", "pattern"),
    [
        ({"eval.fraction": 0}, r"key 'eval\.fraction': Input should be greater than 0"),
        ({"eval.fraction": 1.0}, r"key 'eval\.fraction': Input should be less than 1"),
        ({"eval.fraction": 0.1, "eval.paths": ["a.bin"]}, r"'fraction' or 'paths', not both"),
        ({"eval.enabled": True}, r"enabled = true needs 'fraction' or 'paths'"),
        ({"eval.interval": 50}, r"'interval' set, but no 'fraction' or 'paths'"),
        ({"eval.max_batches": 0}, r"key 'eval\.max_batches'"),
        ({"eval.every": 5}, r"unknown key 'eval\.every'"),
        ({"metrics.mlflow": True}, r"unknown key 'metrics\.mlflow'"),
    ],
)
def test_bad_eval_config_refused(items, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_train_config(None, items)


def test_eval_is_on_when_a_source_is_given():
    assert not load_train_config().eval.active
    assert load_train_config(None, {"eval.fraction": 0.01}).eval.active
    assert load_train_config(None, {"eval.paths": ["x.bin"]}).eval.active
    assert not load_train_config(None, {"eval.fraction": 0.01, "eval.enabled": False}).eval.active


def test_plot_needs_the_jsonl_sink(capsys):
    assert main(["--set", "metrics.jsonl=false", "--plot"]) == 2
    assert "--plot reads metrics.jsonl: set metrics.jsonl=true" in capsys.readouterr().err


@pytest.fixture(scope="module")
def paths_runs(files) -> dict:
    corpus, _ = files
    (result,) = run_spawned(
        1, "tests.train._eval_scenarios:eval_paths_runs", timeout_s=180, corpus=str(corpus)
    )
    return result


@pytest.mark.parametrize("kind", ["tokens", "text"])
def test_heldout_files_of_their_own(paths_runs, kind):
    result = paths_runs[kind]
    assert result["step"] == 2, "the last step always evaluates"
    assert result["eval_tokens"] == result["expected_tokens"] > 0
    if kind == "tokens":
        # The training corpus is [data]'s alone; the held-out files' documents (cut to the
        # model's positions) are all evaluated.
        assert result["train_documents"] > result["file_documents"] == 6
        assert result["documents"] >= 6
