"""Named model shapes (harness, training loop, benchmarks) and the one way to override them.

The ``qwen3-*`` rows are the public Qwen3 dense checkpoints' ``config.json`` shapes
(huggingface.co/Qwen/Qwen3-<size>): vocabulary 151936, RoPE base 1e6, RMSNorm eps 1e-6,
``max_position_embeddings`` 40960. ``cpu-small`` is the default: big enough that matmuls
dominate a step on a small CPU, small enough that eager plus three compiled presets
finish in about three minutes on two cores. ``tiny`` exists for tests.
"""

import dataclasses
from dataclasses import asdict, dataclass

from pydantic import ValidationError

from d9d.core.config_errors import validation_problems
from d9d.module.model.qwen3_dense.params import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)


@dataclass(frozen=True)
class ModelPreset:
    """One Qwen3 Dense shape.

    Attributes:
        description: One line for ``--help``.
        hidden_size: Model width.
        intermediate_size: MLP width.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads.
        head_dim: Size of one head.
        num_hidden_layers: Number of layers.
        vocab_size: Vocabulary size (one split named ``text``).
        max_position_ids: RoPE table length (the longest sequence).
        rope_base: RoPE frequency base.
        rms_norm_eps: RMSNorm epsilon.
    """

    description: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    max_position_ids: int
    rope_base: int = 1_000_000
    rms_norm_eps: float = 1e-6

    def parameters(self, num_hidden_layers: int | None = None) -> Qwen3DenseForCausalLMParameters:
        """The causal-LM parameters of this shape.

        Args:
            num_hidden_layers: Overrides the number of layers (e.g. to time compile
                against depth).

        Returns:
            Validated parameters (pydantic raises a ``ValueError`` naming the field for
            a shape the model rejects).
        """
        return Qwen3DenseForCausalLMParameters(
            model=Qwen3DenseParameters(
                layer=Qwen3DenseLayerParameters(
                    hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size,
                    num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads,
                    rms_norm_eps=self.rms_norm_eps,
                    head_dim=self.head_dim,
                ),
                num_hidden_layers=num_hidden_layers or self.num_hidden_layers,
                rope_base=self.rope_base,
                max_position_ids=self.max_position_ids,
                split_vocab_size={"text": self.vocab_size},
                split_vocab_order=["text"],
            )
        )

    def as_dict(self) -> dict:
        """The shape as a plain dict (for JSON)."""
        return asdict(self)


def _qwen3(description, hidden, intermediate, heads, layers) -> ModelPreset:
    # Every Qwen3 dense checkpoint shares these: 8 KV heads, head_dim 128, vocab 151936.
    return ModelPreset(
        description=description,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=layers,
        vocab_size=151_936,
        max_position_ids=40_960,
    )


MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        description="2 layers, hidden 64, vocab 512: for tests, finishes in seconds",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=512,
        max_position_ids=256,
    ),
    "cpu-small": ModelPreset(
        description="4 layers, hidden 512, 8/4 heads of 64, vocab 32000: the CPU default",
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=4,
        vocab_size=32_000,
        max_position_ids=4096,
    ),
    "qwen3-0.6b": _qwen3("Qwen/Qwen3-0.6B shape", 1024, 3072, 16, 28),
    "qwen3-1.7b": _qwen3("Qwen/Qwen3-1.7B shape", 2048, 6144, 16, 28),
    "qwen3-4b": _qwen3("Qwen/Qwen3-4B shape", 2560, 9728, 32, 36),
    "qwen3-8b": _qwen3("Qwen/Qwen3-8B shape", 4096, 12288, 32, 36),
    "qwen3-14b": _qwen3("Qwen/Qwen3-14B shape", 5120, 17408, 40, 40),
    "qwen3-32b": _qwen3("Qwen/Qwen3-32B shape", 5120, 25600, 64, 64),
}
"""Model shapes by name (case-insensitive in :func:`get_model_preset`)."""


def get_model_preset(name: str) -> ModelPreset:
    """Looks a preset up by name, ignoring case.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    preset = MODEL_PRESETS.get(name.lower())
    if preset is None:
        raise ValueError(f"unknown model preset '{name}' (known: {', '.join(MODEL_PRESETS)})")
    return preset


SHAPE_FLAGS: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}
"""Command-line shape flags (``--num-layers``, ...) of the profiling scripts -> fields."""

SHAPE_FIELDS: tuple[str, ...] = (*SHAPE_FLAGS.values(), "max_position_ids")
"""The fields of a preset that :func:`preset_parameters` overrides."""


def preset_parameters(name: str, **overrides: int | None) -> Qwen3DenseForCausalLMParameters:
    """The causal-LM parameters of a named shape with some of its fields overridden.

    Args:
        name: A key of :data:`MODEL_PRESETS` (case-insensitive).
        **overrides: Fields of :data:`SHAPE_FIELDS`; ``None`` keeps the preset's value.

    Returns:
        Validated parameters.

    Raises:
        ValueError: For an unknown preset or field, or a shape the model rejects (the
            message names the preset, the overrides and the field).
    """
    preset = get_model_preset(name)
    unknown = sorted(set(overrides) - set(SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"unknown model shape field(s) {unknown}; known: {list(SHAPE_FIELDS)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return dataclasses.replace(preset, **given).parameters()
    except ValidationError as err:
        shape = name.lower() + "".join(f" {k}={v}" for k, v in given.items())
        raise ValueError(f"model shape rejected ({shape}): {validation_problems(err)}") from None
