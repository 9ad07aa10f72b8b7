"""Qwen3 Dense parameters from and to a Hugging Face ``config.json``.

The reader accepts what ``transformers`` writes for ``Qwen3ForCausalLM`` and
``Qwen3ForSequenceClassification``: version 5 keeps RoPE settings under
``rope_parameters``; version 4 wrote ``rope_theta`` at the top level and ``rope_scaling``
for scaled variants. Every field whose value changes the maths into something this model
does not compute (sliding-window attention, scaled or partial RoPE, projection biases,
another activation, attention dropout, quantised weights) is refused with a ``ValueError``
naming the field, instead of loading a model that would silently differ from the
checkpoint's.
"""

import json
import math
import os
from typing import Any

import torch

from d9d.module.model.qwen3_dense.params import (
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)

HF_CONFIG_NAME = "config.json"
DEFAULT_SPLIT_NAME = "main"

# transformers' own default when a config names no RoPE base at all.
_HF_DEFAULT_ROPE_THETA = 10000.0
_ROPE_KEYS_UNDERSTOOD = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads an HF ``config.json`` (given the file or the checkpoint folder).

    Args:
        path: A checkpoint folder holding ``config.json``, or the file itself.

    Returns:
        The parsed JSON object.

    Raises:
        FileNotFoundError: If there is no ``config.json``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, HF_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config at {path!r} (expected a folder with config.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    return dict(config) if isinstance(config, dict) else read_hf_config(config)


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"HF config field {field!r} = {value!r} is not supported by Qwen3Dense: {why}"
    )


def _required(config: dict[str, Any], field: str) -> Any:
    if config.get(field) is None:
        raise ValueError(f"HF config has no {field!r}; it is required to build Qwen3Dense")
    return config[field]


def _rope_dicts(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every RoPE settings dict of the config, labelled with the field it came from."""
    found = []
    for field in ("rope_parameters", "rope_scaling"):
        value = config.get(field)
        if not value:
            continue
        if not isinstance(value, dict):
            raise _refuse(field, value, "expected a JSON object")
        layer_types = set(config.get("layer_types") or ()) | {"full_attention"}
        if set(value) <= layer_types and all(isinstance(v, dict) for v in value.values()):
            # transformers 5 may nest RoPE settings per attention type.
            found.extend((f"{field}.{name}", v) for name, v in value.items())
        else:
            found.append((field, value))
    return found


def _rope_base(config: dict[str, Any]) -> int:
    thetas: dict[str, float] = {}
    if config.get("rope_theta") is not None:
        thetas["rope_theta"] = config["rope_theta"]
    for field, rope in _rope_dicts(config):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise _refuse(
                f"{field}.rope_type",
                rope_type,
                "only plain RoPE ('default') is implemented, not scaled variants",
            )
        factor = rope.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise _refuse(
                f"{field}.partial_rotary_factor", factor, "RoPE rotates the whole head_dim"
            )
        unknown = sorted(set(rope) - _ROPE_KEYS_UNDERSTOOD)
        if unknown:
            raise _refuse(f"{field}.{unknown[0]}", rope[unknown[0]], "unknown RoPE setting")
        if rope.get("rope_theta") is not None:
            thetas[f"{field}.rope_theta"] = rope["rope_theta"]
    if config.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise _refuse(
            "partial_rotary_factor",
            config["partial_rotary_factor"],
            "RoPE rotates the whole head_dim",
        )
    if len(set(thetas.values())) > 1:
        raise ValueError(f"HF config gives conflicting RoPE bases: {thetas}")
    theta = next(iter(thetas.values()), _HF_DEFAULT_ROPE_THETA)
    field = next(iter(thetas), "rope_theta")
    # Qwen3DenseParameters.rope_base is an integer (the seed's type); every published
    # Qwen3 base is a whole number, so anything else is refused rather than rounded.
    if not isinstance(theta, int | float) or theta <= 0 or not math.isclose(theta, round(theta)):
        raise _refuse(field, theta, "the RoPE base must be a positive whole number")
    return round(theta)


def _check_supported(config: dict[str, Any]) -> None:
    model_type = config.get("model_type", "qwen3")
    if model_type != "qwen3":
        raise _refuse("model_type", model_type, "only 'qwen3' (dense) checkpoints are read")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "the MLP is SwiGLU with silu")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise _refuse(field, config[field], "the projections have no bias")
    if config.get("use_sliding_window"):
        raise _refuse(
            "use_sliding_window", True, "attention is full causal attention on every layer"
        )
    layer_types = config.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise _refuse("layer_types", other, "every layer must be 'full_attention'")
    dropout = config.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise _refuse("attention_dropout", dropout, "attention has no dropout")
    if config.get("quantization_config"):
        raise _refuse(
            "quantization_config",
            config["quantization_config"].get("quant_method", "..."),
            "quantised weights cannot be loaded; use an unquantised checkpoint",
        )


def backbone_params_from_hf_config(
    config: dict[str, Any] | str | os.PathLike,
    *,
    split_vocab_size: dict[str, int] | None = None,
    split_vocab_order: list[str] | None = None,
    max_position_ids: int | None = None,
    pipeline_num_virtual_layers_pre: int = 0,
    pipeline_num_virtual_layers_post: int = 0,
) -> Qwen3DenseParameters:
    """Builds :class:`Qwen3DenseParameters` from an HF Qwen3 config.

    Args:
        config: The parsed ``config.json``, its path, or the checkpoint folder.
        split_vocab_size: Vocabulary splits (sizes must add up to the config's
            ``vocab_size``; rows of the HF embedding are assigned to splits contiguously
            in ``split_vocab_order``). Default: one split named ``"main"``.
        split_vocab_order: Order of the splits (default: the order of
            ``split_vocab_size``).
        max_position_ids: Length of the RoPE tables (default: the config's
            ``max_position_embeddings``); a smaller value saves memory on short sequences.
        pipeline_num_virtual_layers_pre: See :class:`Qwen3DenseParameters`.
        pipeline_num_virtual_layers_post: See :class:`Qwen3DenseParameters`.

    Returns:
        The backbone parameters.

    Raises:
        ValueError: If a field asks for something this model does not implement (the
            message names it), a required field is missing, or the splits do not add up.
    """
    config = _as_config(config)
    _check_supported(config)
    vocab_size = _required(config, "vocab_size")
    if split_vocab_size is None:
        split_vocab_size = {DEFAULT_SPLIT_NAME: vocab_size}
    if sum(split_vocab_size.values()) != vocab_size:
        raise ValueError(
            f"split_vocab_size {split_vocab_size} adds up to {sum(split_vocab_size.values())}, "
            f"but the HF config field 'vocab_size' is {vocab_size}"
        )
    num_attention_heads = _required(config, "num_attention_heads")
    num_key_value_heads = config.get("num_key_value_heads") or num_attention_heads
    layer = Qwen3DenseLayerParameters(
        hidden_size=_required(config, "hidden_size"),
        intermediate_size=_required(config, "intermediate_size"),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        rms_norm_eps=_required(config, "rms_norm_eps"),
        head_dim=_required(config, "head_dim"),
    )
    return Qwen3DenseParameters(
        layer=layer,
        num_hidden_layers=_required(config, "num_hidden_layers"),
        rope_base=_rope_base(config),
        max_position_ids=max_position_ids or _required(config, "max_position_embeddings"),
        split_vocab_size=dict(split_vocab_size),
        split_vocab_order=list(split_vocab_order or split_vocab_size),
        pipeline_num_virtual_layers_pre=pipeline_num_virtual_layers_pre,
        pipeline_num_virtual_layers_post=pipeline_num_virtual_layers_post,
    )


def causal_lm_params_from_hf_config(
    config: dict[str, Any] | str | os.PathLike, **backbone_kwargs: Any
) -> Qwen3DenseForCausalLMParameters:
    """Builds :class:`Qwen3DenseForCausalLMParameters` from an HF Qwen3 config.

    ``tie_word_embeddings`` is not a parameter of this model: the loader
    (:func:`d9d.module.model.qwen3_dense.hf_io.load_hf_checkpoint`) reads it from the
    folder and initialises the LM head from the embedding (see there).

    Args:
        config: The parsed ``config.json``, its path, or the checkpoint folder.
        **backbone_kwargs: Forwarded to :func:`backbone_params_from_hf_config`.

    Returns:
        The causal-LM parameters.
    """
    return Qwen3DenseForCausalLMParameters(
        model=backbone_params_from_hf_config(config, **backbone_kwargs)
    )


def classification_params_from_hf_config(
    config: dict[str, Any] | str | os.PathLike,
    *,
    num_labels: int | None = None,
    classifier_dropout: float = 0.0,
    **backbone_kwargs: Any,
) -> Qwen3DenseForClassificationParameters:
    """Builds :class:`Qwen3DenseForClassificationParameters` from an HF Qwen3 config.

    Args:
        config: The parsed ``config.json``, its path, or the checkpoint folder (a
            ``Qwen3ForSequenceClassification`` one, or a causal-LM one to start a new
            classifier from).
        num_labels: Number of classes; default: the config's ``num_labels``, else the
            length of its ``id2label``.
        classifier_dropout: Dropout before ``score``. The default 0.0 is what HF
            ``Qwen3ForSequenceClassification`` computes (it has no dropout there, and
            ignores a ``classifier_dropout`` config field), so it is an explicit choice
            here rather than read from the config.
        **backbone_kwargs: Forwarded to :func:`backbone_params_from_hf_config`.

    Returns:
        The classification parameters.

    Raises:
        ValueError: If the number of labels is neither given nor in the config.
    """
    config = _as_config(config)
    if num_labels is None:
        num_labels = config.get("num_labels")
    if num_labels is None and config.get("id2label"):
        num_labels = len(config["id2label"])
    if num_labels is None:
        raise ValueError(
            "HF config has neither 'num_labels' nor 'id2label'; pass num_labels= explicitly"
        )
    return Qwen3DenseForClassificationParameters(
        model=backbone_params_from_hf_config(config, **backbone_kwargs),
        num_labels=num_labels,
        classifier_dropout=classifier_dropout,
    )


# Fields that describe a different architecture or a previous save; the exporter owns them.
_STALE_FIELDS = ("rope_scaling", "torch_dtype", "transformers_version", "num_labels")


def hf_config_from_params(
    params: Qwen3DenseForCausalLMParameters | Qwen3DenseForClassificationParameters,
    *,
    dtype: torch.dtype = torch.float32,
    base_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes an HF ``Qwen3ForCausalLM`` / ``Qwen3ForSequenceClassification`` config.

    The vocabulary splits become one ``vocab_size``; embeddings are written untied
    (``tie_word_embeddings: false``) because this model trains its head separately.

    Args:
        params: The model parameters.
        dtype: The dtype the weights are saved in (recorded as ``dtype``).
        base_config: The source checkpoint's config, whose other fields (token ids,
            label names, ...) are kept; every architecture field is overwritten.

    Returns:
        A JSON-serialisable dict.
    """
    backbone = params.model
    layer = backbone.layer
    out = {k: v for k, v in (base_config or {}).items() if k not in _STALE_FIELDS}
    out.update(
        model_type="qwen3",
        vocab_size=backbone.vocab_size,
        hidden_size=layer.hidden_size,
        intermediate_size=layer.intermediate_size,
        num_hidden_layers=backbone.num_hidden_layers,
        num_attention_heads=layer.num_attention_heads,
        num_key_value_heads=layer.num_key_value_heads,
        head_dim=layer.head_dim,
        hidden_act="silu",
        rms_norm_eps=layer.rms_norm_eps,
        max_position_embeddings=backbone.max_position_ids,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        rope_parameters={"rope_type": "default", "rope_theta": float(backbone.rope_base)},
        rope_theta=float(backbone.rope_base),
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        layer_types=["full_attention"] * backbone.num_hidden_layers,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    if isinstance(params, Qwen3DenseForClassificationParameters):
        out["architectures"] = ["Qwen3ForSequenceClassification"]
        id2label = out.get("id2label")
        if not id2label or len(id2label) != params.num_labels:
            id2label = {str(i): f"LABEL_{i}" for i in range(params.num_labels)}
        out["id2label"] = id2label
        out["label2id"] = {name: int(i) for i, name in id2label.items()}
    else:
        out["architectures"] = ["Qwen3ForCausalLM"]
    return out
