"""Regional compilation: ``torch.compile`` of each ``Qwen3DenseLayer`` on its own.

``Module.compile`` compiles the layer's ``__call__`` in place instead of wrapping the
layer in an ``OptimizedModule``, so the module tree, parameter names and state-dict keys
stay exactly as in eager. All layers run the same code with the same guards (their
parameters are graph inputs), so one compiled graph serves every layer and compile time
does not grow with depth.
"""

from d9d.compile.config import CompileSection
from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer


def compile_layers(layers: list[Qwen3DenseLayer], section: CompileSection) -> None:
    """Compiles every layer in place with the settings of ``section``.

    Compilation is lazy: the graph is built on the first call, so this works on a model
    still on the ``meta`` device.

    Args:
        layers: The model's ``Qwen3DenseLayer`` modules (possibly checkpointed).
        section: The ``[compile]`` config; nothing happens unless ``enabled``.
    """
    if not section.enabled:
        return
    for layer in layers:
        layer.compile(backend=section.backend, fullgraph=section.fullgraph, dynamic=section.dynamic)
