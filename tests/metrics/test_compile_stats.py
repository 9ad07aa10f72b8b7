"""Graph breaks and recompiles are counted per config and reset between configs."""

import torch

from d9d.metrics.compile_stats import read_compile_stats, reset_compile_state


def _with_break(x):
    x = x * 2
    torch._dynamo.graph_break()
    return x + 1


def test_graph_breaks_are_counted_and_reset():
    reset_compile_state()
    torch.compile(_with_break, backend="eager")(torch.ones(3))
    stats = read_compile_stats()
    assert stats.graph_breaks == 1
    assert stats.graphs == 2
    reset_compile_state()
    assert read_compile_stats().graph_breaks == 0
    assert read_compile_stats().graphs == 0


def _double(x):
    return x * 2


def test_a_new_shape_is_one_recompile_and_a_repeat_is_none():
    reset_compile_state()
    compiled = torch.compile(_double, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    compiled(torch.ones(3))
    assert read_compile_stats().recompiles == 0
    compiled(torch.ones(5))
    assert read_compile_stats().recompiles == 1
    # After a reset the same function compiles afresh: not a recompile.
    reset_compile_state()
    torch.compile(_double, backend="eager", dynamic=False)(torch.ones(3))
    assert read_compile_stats().recompiles == 0
