"""ModuleLateInit protocol."""

from torch import nn

from d9d.module.base import ModuleLateInit
from d9d.module.block.attention import GroupedQueryAttention
from d9d.module.block.embedding import SplitTokenEmbeddings
from d9d.module.block.head import ClassificationHead, SplitLanguageModellingHead
from d9d.module.block.norm import RMSNorm
from d9d.module.block.rope import RotaryEmbeddingProvider
from d9d.module.block.swiglu import SwiGLU


def test_module_late_init_is_runtime_checkable_on_reset_parameters():
    class Late:
        def reset_parameters(self) -> None:
            pass

    assert isinstance(Late(), ModuleLateInit)
    assert not isinstance(object(), ModuleLateInit)
    assert not isinstance(nn.ReLU(), ModuleLateInit)


def test_every_block_supports_late_init():
    blocks = [
        RMSNorm(4, 1e-6),
        RotaryEmbeddingProvider(4, 10000.0, 8),
        GroupedQueryAttention(8, 2, 1, 4, 1e-6),
        SwiGLU(4, 8),
        SplitTokenEmbeddings({"a": 3}, ["a"], 4),
        SplitLanguageModellingHead({"a": 3}, ["a"], 4),
        ClassificationHead(4, 2, 0.0),
    ]
    for block in blocks:
        assert isinstance(block, ModuleLateInit), type(block).__name__
