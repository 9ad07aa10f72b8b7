"""Regional compilation: ``torch.compile`` of each ``Qwen3DenseLayer`` on its own.

``Module.compile`` compiles the layer's ``__call__`` in place instead of wrapping the
layer in an ``OptimizedModule``, so the module tree, parameter names and state-dict keys
stay exactly as in eager. All layers run the same code with the same guards (their
parameters are graph inputs), so one compiled graph serves every layer and compile time
does not grow with depth.
"""

from torch import nn

from d9d.compile.config import CompileSection
from d9d.module.block.chunked_nll import compiled_nll_kernels
from d9d.module.block.head import SplitLanguageModellingHead
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
        layer.is_compiled = True


def compile_loss_kernels(model: nn.Module, section: CompileSection) -> bool:
    """Gives a causal-LM head the fused, compiled loss kernels.

    The head's per-token NLL (``logsumexp``, the label pick, and ``softmax - onehot`` in
    backward) is a handful of fp32 passes over ``(tokens, V)`` logits in eager mode;
    compiled, each direction is one fused pass that never materialises fp32 logits. The
    kernels are two small dynamic-shape graphs shared by every model in the process.

    Args:
        model: The model (or pipeline stage); only a last stage holding ``lm_head``
            changes.
        section: The ``[compile]`` config; nothing happens unless ``enabled``.

    Returns:
        Whether a head was switched to compiled kernels.
    """
    head = getattr(model, "lm_head", None)
    if not section.enabled or not isinstance(head, SplitLanguageModellingHead):
        return False
    head.nll_kernels = compiled_nll_kernels(section.backend)
    return True
