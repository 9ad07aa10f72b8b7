"""The compile configuration: one validated object per ``compile_configs/*.toml`` preset.

A preset drives the middle of the training stack's order (built by ``d9d.stack``):
float8 conversion, the activation-checkpoint policy, regional ``torch.compile``, and the
FSDP2 mixed-precision settings that the builder hands to the distributed layer. Every
section rejects unknown keys, and :func:`load_compile_config` names the file and the
dotted key of every error.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from d9d.core.config_errors import read_toml, validation_problems

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

PRESET_DIR = Path(__file__).resolve().parents[2] / "compile_configs"
"""Folder of the named presets (``compile_configs/`` at the repository root)."""

DEFAULT_SAVED_OPS: tuple[str, ...] = (
    # Matmuls and attention dominate the FLOPs: saving their outputs leaves only cheap
    # elementwise work (norms, RoPE, SiLU) to recompute.
    "aten.mm",
    "aten._scaled_mm",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    # FlexAttention (the packed-document kernel on CUDA) is a higher-order op.
    "higher_order.flex_attention",
    # float8 scales: an amax is tiny to keep but recomputing it re-reads a whole tensor.
    "aten.max",
    "aten.amax",
    # Recomputing a collective would repeat the communication (tensor/FSDP reductions).
    "_c10d_functional.reduce_scatter_tensor",
)
"""Ops whose outputs the selective policy saves by default (everything else is recomputed)."""

DtypeName = Literal["float32", "bfloat16", "float16"]


def resolve_op(name: str) -> torch._ops.OpOverloadPacket | torch._ops.OpOverload:
    """Maps ``"namespace.op"`` or ``"namespace.op.overload"`` to the torch op.

    Raises:
        ValueError: If no such op is registered.
    """
    parts = name.split(".")
    if len(parts) not in (2, 3):
        raise ValueError(f"op name {name!r} must look like 'aten.mm' or 'aten.mm.default'")
    try:
        op = getattr(getattr(torch.ops, parts[0]), parts[1])
        return getattr(op, parts[2]) if len(parts) == 3 else op
    except (AttributeError, RuntimeError) as err:
        raise ValueError(f"unknown op {name!r} in saved_ops") from err


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompileSection(_Section):
    """``[compile]``: regional ``torch.compile`` of every ``Qwen3DenseLayer``.

    Attributes:
        enabled: Compile each layer (``Module.compile``, so state-dict keys are unchanged).
        backend: ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ...).
        fullgraph: Fail on any graph break instead of silently splitting the layer.
        dynamic: ``torch.compile``'s ``dynamic``; ``None`` compiles static shapes first
            and turns dynamic on the first shape change (one recompile in all).
    """

    enabled: bool = False
    backend: str = "inductor"
    fullgraph: bool = True
    dynamic: bool | None = None


class ActivationCheckpointingSection(_Section):
    """``[activation_checkpointing]``: what each layer keeps for its backward.

    Attributes:
        mode: ``"none"`` keeps every activation; ``"full"`` keeps only the layer input
            and recomputes the whole forward; ``"selective"`` keeps the outputs of
            ``saved_ops`` and recomputes the rest; ``"memory_budget"`` lets the
            compiler's min-cut partitioner choose, under ``memory_budget`` (compile only).
        saved_ops: Selective only. Op names (``"aten.mm"`` or ``"aten.mm.default"``)
            whose outputs are saved.
        save_every_other_matmul: Selective only. Save the output of every second
            ``aten.mm`` of a layer and recompute the others (halves matmul memory for
            half a forward's worth of matmul recompute).
        memory_budget: ``memory_budget`` only. 0.0 is the memory of full checkpointing,
            1.0 that of the compiler's default (speed-optimal) choice.
    """

    mode: Literal["none", "full", "selective", "memory_budget"] = "none"
    saved_ops: tuple[str, ...] = DEFAULT_SAVED_OPS
    save_every_other_matmul: bool = False
    memory_budget: float = Field(default=0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _options_match_mode(self) -> "ActivationCheckpointingSection":
        # An option of another mode is silently ignored otherwise; a preset that sets it
        # almost certainly meant that other mode.
        for option in ("saved_ops", "save_every_other_matmul"):
            if option in self.model_fields_set and self.mode != "selective":
                raise ValueError(f"{option} only applies to mode='selective', not {self.mode!r}")
        if "memory_budget" in self.model_fields_set and self.mode != "memory_budget":
            raise ValueError(
                f"memory_budget only applies to mode='memory_budget', not {self.mode!r}"
            )
        for name in self.saved_ops:
            resolve_op(name)
        return self


class Float8Section(_Section):
    """``[float8]``: torchao float8 training linears.

    Attributes:
        enabled: Swap eligible ``nn.Linear`` modules for torchao ``Float8Linear``.
        recipe: ``"tensorwise"`` (one scale per tensor, fastest) or ``"rowwise"`` (one
            scale per row, more accurate with outliers).
        skip_patterns: ``fnmatch`` patterns on module FQNs that stay in high precision.
            Linears whose in/out features are not multiples of 16 are always skipped
            (float8 GEMMs need them), and so are the output heads by default.
        enable_fsdp_float8_all_gather: All-gather FSDP2 weights in float8 (tensorwise
            only); the trainer must then call torchao's
            ``precompute_float8_dynamic_scale_for_fsdp`` after each optimizer step.
    """

    enabled: bool = False
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    skip_patterns: tuple[str, ...] = ("lm_head.*", "cls_head.*")
    enable_fsdp_float8_all_gather: bool = False

    @model_validator(mode="after")
    def _all_gather_needs_tensorwise(self) -> "Float8Section":
        if self.enable_fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError("enable_fsdp_float8_all_gather needs recipe='tensorwise'")
        return self


class FsdpSection(_Section):
    """``[fsdp]``: FSDP2 settings read by ``d9d.module.parallelism``.

    ``None`` keeps parameters and reductions in the parameter dtype, and lets
    ``d9d.module.parallelism`` choose resharding: FSDP2's default without pipelining, no
    resharding of the layers under pipelining (and never of the norm + head). Use
    :meth:`torch_param_dtype` / :meth:`torch_reduce_dtype` to build a
    ``MixedPrecisionPolicy``.

    Attributes:
        param_dtype: Dtype parameters are all-gathered and computed in.
        reduce_dtype: Dtype gradients are reduce-scattered in.
        reshard_after_forward: ``fully_shard``'s argument of the same name.
    """

    param_dtype: DtypeName | None = None
    reduce_dtype: DtypeName | None = None
    reshard_after_forward: bool | None = None

    def torch_param_dtype(self) -> torch.dtype | None:
        """Returns ``param_dtype`` as a ``torch.dtype`` (``None`` when unset)."""
        return None if self.param_dtype is None else getattr(torch, self.param_dtype)

    def torch_reduce_dtype(self) -> torch.dtype | None:
        """Returns ``reduce_dtype`` as a ``torch.dtype`` (``None`` when unset)."""
        return None if self.reduce_dtype is None else getattr(torch, self.reduce_dtype)

    @property
    def is_mixed_precision(self) -> bool:
        """Whether FSDP2 casts parameters or gradients (needs FSDP2, even on one process)."""
        return self.param_dtype is not None or self.reduce_dtype is not None

    def mp_policy(self) -> "MixedPrecisionPolicy":
        """The FSDP2 ``MixedPrecisionPolicy`` of this section (no casting when unset)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=self.torch_param_dtype(), reduce_dtype=self.torch_reduce_dtype()
        )


class AttentionSection(_Section):
    """``[attention]``: the kernel that attends over packed rows (several documents each).

    Rows with consecutive positions always run plain causal SDPA, whatever this says.

    Attributes:
        backend: ``"auto"`` (FlexAttention on CUDA, SDPA elsewhere), ``"sdpa"`` (a
            boolean document mask) or ``"flex"`` (block-sparse FlexAttention; no
            backward on the CPU).
    """

    backend: Literal["auto", "sdpa", "flex"] = "auto"


class CompileConfig(_Section):
    """A whole compile preset.

    Attributes:
        name: Preset name (the TOML file's stem), filled in by :func:`load_compile_config`.
        compile: Regional ``torch.compile`` settings.
        activation_checkpointing: Checkpoint policy around each layer.
        float8: torchao float8 settings.
        fsdp: FSDP2 mixed-precision settings (consumed by the distributed layer).
        attention: The packed-document attention backend.
    """

    name: str = "custom"
    compile: CompileSection = Field(default_factory=CompileSection)
    activation_checkpointing: ActivationCheckpointingSection = Field(
        default_factory=ActivationCheckpointingSection
    )
    float8: Float8Section = Field(default_factory=Float8Section)
    fsdp: FsdpSection = Field(default_factory=FsdpSection)
    attention: AttentionSection = Field(default_factory=AttentionSection)


def list_presets() -> list[str]:
    """Returns the sorted names of the presets in :data:`PRESET_DIR`."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.toml"))


def load_compile_config(path_or_preset_name: str | Path) -> CompileConfig:
    """Reads and validates a compile config.

    Args:
        path_or_preset_name: A path to a TOML file, or a bare preset name such as
            ``"compile_sac"`` (resolved to ``compile_configs/compile_sac.toml``).

    Returns:
        The validated config, ``name`` set to the file's stem.

    Raises:
        ValueError: If the preset does not exist (the message lists the available ones),
            or the file is not valid TOML, or a key is unknown or has a bad value (the
            message names the file and the dotted key).
    """
    path = Path(path_or_preset_name)
    if path.suffix != ".toml" and len(path.parts) == 1:
        path = PRESET_DIR / f"{path.name}.toml"
        if not PRESET_DIR.is_dir():
            # The presets live in the repository, next to the package: a non-editable
            # install does not carry them.
            raise ValueError(
                f"compile preset {str(path_or_preset_name)!r}: no preset folder at "
                f"{PRESET_DIR} (install the repository with `pip install -e .`, or pass the "
                "path of a TOML file)"
            )
        if not path.is_file():
            raise ValueError(
                f"unknown compile preset {str(path_or_preset_name)!r}; "
                f"available: {', '.join(list_presets())}"
            )
    data = read_toml(path, "compile config")
    if "name" in data:
        raise ValueError(f"{path}: key 'name' is not allowed (the name is the file's stem)")
    try:
        return CompileConfig.model_validate({**data, "name": path.stem})
    except ValidationError as err:
        raise ValueError(f"{path}: invalid compile config: {validation_problems(err)}") from err
