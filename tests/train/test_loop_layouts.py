"""The same 10 steps on real data give the same losses and norms under every layout."""

import pytest

from tests.helpers import run_spawned
from tests.train._loop_scenarios import LAYOUTS, STEPS, world_size, write_corpus, write_hf_init

# fp32 throughout: layouts differ only in summation order (reductions over ranks and
# microbatches), which AdamW carries over 10 steps; 1e-5 relative bounds that.
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus(folder)
    init = str(write_hf_init(folder, corpus))
    results: dict[str, dict] = {}
    by_world: dict[int, list[str]] = {}
    for name, layout in LAYOUTS.items():
        by_world.setdefault(world_size(layout), []).append(name)
    for world, names in by_world.items():
        per_rank = run_spawned(
            world,
            "tests.train._loop_scenarios:train_layouts",
            timeout_s=300,
            corpus=str(corpus),
            init=init,
            names=names,
        )
        for name in names:
            # Every rank logs the same global loss and norm.
            for rank in per_rank[1:]:
                assert rank[name]["loss"] == per_rank[0][name]["loss"], name
                assert rank[name]["grad_norm"] == per_rank[0][name]["grad_norm"], name
            results[name] = per_rank[0][name]
    return results


def test_reference_trains_and_clips(runs):
    ref = runs["one process"]
    assert len(ref["loss"]) == STEPS
    assert ref["loss"][-1] < ref["loss"][0] - 0.3, "the loss must fall on real text"
    assert min(ref["grad_norm"]) > 0.5, "clipping must be active on every step"
    assert ref["lr"][:3] == pytest.approx([1e-3, 2e-3, 3e-3])


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "one process"])
def test_layout_matches_one_process(runs, name):
    ref = runs["one process"]
    got = runs[name]
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), name
