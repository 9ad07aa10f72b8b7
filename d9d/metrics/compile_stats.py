"""Graph breaks and recompiles of ``torch.compile``, counted per benchmarked config.

Dynamo keeps process-global state: its caches (a second config compiling the same
``Qwen3DenseLayer.forward`` would look like a recompile of the first) and its counters.
:func:`reset_compile_state` clears both so that every config is counted from zero.

* graph breaks: the sum of ``torch._dynamo.utils.counters["graph_break"]`` (one entry
  per break reason);
* recompiles: compilations of a code object that already had a compiled entry
  (``cache_size > 0`` in dynamo's compilation metrics). Regional compile of ``L``
  identical layers must give one compilation and zero recompiles;
* graphs: ``counters["stats"]["unique_graphs"]``.
"""

from dataclasses import dataclass

import torch
import torch._dynamo
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics


@dataclass(frozen=True)
class CompileStats:
    """Compilation counters since the last :func:`reset_compile_state`.

    Attributes:
        graph_breaks: Number of graph breaks.
        recompiles: Number of re-compilations of an already compiled frame.
        graphs: Number of graphs compiled.
    """

    graph_breaks: int
    recompiles: int
    graphs: int


def reset_compile_state() -> None:
    """Forgets every compiled graph and zeroes the counters."""
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()


def read_compile_stats() -> CompileStats:
    """Reads the counters accumulated since :func:`reset_compile_state`."""
    recompiles = sum(1 for metric in get_compilation_metrics() if (metric.cache_size or 0) > 0)
    return CompileStats(
        graph_breaks=sum(counters["graph_break"].values()),
        recompiles=recompiles,
        graphs=counters["stats"]["unique_graphs"],
    )
