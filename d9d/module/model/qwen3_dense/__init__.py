"""The Qwen3 Dense model family."""

from d9d.module.model.qwen3_dense.layer import Qwen3DenseLayer
from d9d.module.model.qwen3_dense.model import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForClassification,
    Qwen3DenseModel,
)
from d9d.module.model.qwen3_dense.params import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)

__all__ = [
    "Qwen3DenseForCausalLM",
    "Qwen3DenseForCausalLMParameters",
    "Qwen3DenseForClassification",
    "Qwen3DenseForClassificationParameters",
    "Qwen3DenseLayer",
    "Qwen3DenseLayerParameters",
    "Qwen3DenseModel",
    "Qwen3DenseParameters",
]
