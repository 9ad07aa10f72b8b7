"""The CI graph-break regression suite: every preset in ``compile_configs/``.

Presets are found by globbing, so a new preset file is tested without touching this
file. One test per preset compiles its graphs once and checks everything on them:
graph breaks, one graph for all layers (2 vs 6), no recompile on repeated steps, at
most one recompile on a shape change, numerics against eager, and the float8 swap.
"""

from fnmatch import fnmatch

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from d9d.compile import (
    PRESET_DIR,
    CompileConfig,
    apply_compile_config,
    load_compile_config,
)
from tests.helpers import build_causal_lm, train_step, with_compile_config

PRESETS = sorted(path.stem for path in PRESET_DIR.glob("*.toml"))

# Compiled fp32 vs eager fp32: inductor fuses and reorders reductions, a few ulps.
FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
# Compiled float8 vs *eager float8* (same conversion). Measured here: as close as fp32
# (largest gradient difference 1.5e-8). Looser because the casts to e4m3 (3 mantissa
# bits) sit behind fusions whose fp32 inputs may differ by an ulp elsewhere (other CPUs,
# other inductor versions): one element that rounds to the neighbouring float8 value
# moves its products by up to 12.5%. 1e-2 still catches a wrong scale (2x); a missed
# conversion is caught by the swap check.
FLOAT8_TOLERANCE = {"rtol": 1e-2, "atol": 1e-4}
# Besides the one layer graph, a compiled causal LM has the two fused LM-head loss
# kernels (forward logsumexp/pick, backward softmax-minus-onehot); both are compiled
# with dynamic shapes, once per process, whatever the depth.
LOSS_KERNEL_GRAPHS = 2


def _graph_stats() -> dict[str, int]:
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _eager_reference(config: CompileConfig, num_layers: int):
    """Same float8 setting, no compile, no checkpointing (which never changes numerics)."""
    eager = CompileConfig(name=f"{config.name}_eager_reference", float8=config.float8)
    return with_compile_config(build_causal_lm(num_layers), eager)


def _assert_close(actual, expected, tolerance, what):
    loss, grads = actual
    ref_loss, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, **tolerance, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], **tolerance, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


def _check_float8_swap(model, report, config: CompileConfig):
    from torchao.float8.float8_linear import Float8Linear

    report = report.float8
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if not config.float8.enabled:
        assert not swapped and report is None
        return
    # By their dims (multiples of 16), q/k/v/o and both LM-head splits (80, 16) are
    # eligible; the MLP (intermediate 72) is not. The preset's patterns then skip by name
    # (the LM head by default).
    eligible = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    eligible |= {"lm_head.lm_head.text", "lm_head.lm_head.special"}
    skip_patterns = config.float8.skip_patterns
    expected = {n for n in eligible if not any(fnmatch(n, p) for p in skip_patterns)}
    assert swapped == expected == set(report.converted)
    assert set(report.skipped) == linears - swapped
    for proj in ("gate", "up", "down"):
        assert "multiples of 16" in report.skipped[f"model.layers.1.mlp.{proj}_proj"]
    for name in eligible - expected:
        assert "skip pattern" in report.skipped[name]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset(preset: str):
    config = load_compile_config(preset)
    compiled = config.compile.enabled
    torch._dynamo.reset()
    counters.clear()
    if config.activation_checkpointing.mode == "memory_budget" and not hasattr(
        torch.autograd.graph, "region_activation_memory_budget"
    ):
        # torch < 2.13 (e.g. 2.11 on the GPU machine) has no scoped budget: the preset must
        # be refused with a message naming the torch version, not fail inside compile.
        with pytest.raises(ValueError, match=r"torch >= 2\.13"):
            apply_compile_config(build_causal_lm(2), config)
        return

    model = build_causal_lm(2)
    _check_float8_swap(model, apply_compile_config(model, config), config)
    first = train_step(model, batch=2, seq=16, seed=0)
    after_first = _graph_stats()
    print(f"{preset}: after the first step {after_first}")
    assert after_first["graph_breaks"] == 0, dict(counters["graph_break"])
    # Exactly one graph (forward; its backward comes with it) for both layers, plus the
    # loss kernels.
    assert after_first["unique_graphs"] == (1 + LOSS_KERNEL_GRAPHS if compiled else 0), after_first

    reference = _eager_reference(config, 2)
    expected = train_step(reference, batch=2, seq=16, seed=0)
    tolerance = FLOAT8_TOLERANCE if config.float8.enabled else FP32_TOLERANCE
    _assert_close(first, expected, tolerance, f"{preset} vs eager")

    # Repeated steps (new data, same shapes) reuse the graph.
    train_step(model, batch=2, seq=16, seed=1)
    assert _graph_stats() == after_first, dict(counters["stats"])

    # A new batch size and sequence length: at most one recompile (to a dynamic graph)
    # for all layers; a further new shape is then served by it.
    _assert_close(
        train_step(model, batch=3, seq=24, seed=2),
        train_step(reference, batch=3, seq=24, seed=2),
        tolerance,
        f"{preset} vs eager after a shape change",
    )
    after_reshape = _graph_stats()
    assert after_reshape["unique_graphs"] - after_first["unique_graphs"] <= 1, after_reshape
    train_step(model, batch=4, seq=20, seed=3)
    assert _graph_stats() == after_reshape, dict(counters["stats"])
    assert after_reshape["graph_breaks"] == 0, dict(counters["graph_break"])

    # Three times the layers, same number of graphs (the compile caches are warm, so
    # this costs tracing only).
    torch._dynamo.reset()
    counters.clear()
    deep = with_compile_config(build_causal_lm(6), config)
    train_step(deep, batch=2, seq=16, seed=0)
    assert _graph_stats() == after_first, dict(counters["stats"])
    print(f"{preset}: 2 layers {after_first}, reshaped {after_reshape}, 6 layers {_graph_stats()}")
