"""float8 training linears through torchao.

Where float8 is decided: :func:`convert_linears_to_float8` swaps each eligible
``nn.Linear`` for torchao's ``Float8Linear`` (same parameter names, so checkpoints are
unaffected) and reports the ones it left in high precision and why.

Eligible means: not matched by a skip pattern, both dims multiples of 16 (what float8
GEMMs need), and, on CUDA, big enough to gain. A float8 linear pays for casting its
input, weight and output gradient (and their amaxes) on every step; on a small GEMM that
costs more than the faster matmul saves, so small projections run *slower* in float8.
The size thresholds are torchao's own recipe filters, measured on H100
(``torchao.float8._auto_filter_for_recipe``): tensorwise converts unless
``in_features <= 4096 and out_features <= 1024``; rowwise needs ``out_features > 2048``,
``in_features > 1024`` and not (``out_features <= 4096 and in_features <= 2048``). On
the CPU float8 is emulated and has no speed to gain, so only the hardware rule applies
there (tests convert tiny linears on purpose).

torchao is imported only here, inside the functions, and only when float8 is asked for:
importing ``d9d`` must not load torchao's compiled extensions.
"""

import dataclasses
import fnmatch
import logging

import torch
from torch import nn

from d9d.compile.config import Float8Section

logger = logging.getLogger(__name__)

FLOAT8_DIM_MULTIPLE = 16
"""float8 GEMMs (``torch._scaled_mm``) need both matrix dims to be multiples of 16."""

_MIN_CUDA_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores


def is_float8_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a torchao float8 training linear (without importing torchao)."""
    return type(module).__name__ == "Float8Linear"


@dataclasses.dataclass
class Float8Report:
    """What the float8 conversion did.

    Attributes:
        converted: FQNs of the linears now running in float8, in module order.
        skipped: FQN -> reason, for every ``nn.Linear`` left in high precision.
    """

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def float8_too_small_reason(in_features: int, out_features: int, recipe: str) -> str | None:
    """Why a GEMM of this size would run slower in float8 than in bf16 (``None``: it gains).

    torchao's recipe filters, measured on H100 (see the module docstring).

    Args:
        in_features: The linear's input size (the GEMM's reduction dim K).
        out_features: The linear's output size (N).
        recipe: ``"tensorwise"`` or ``"rowwise"``.
    """
    k, n = in_features, out_features
    if recipe == "tensorwise":
        small = k <= 4096 and n <= 1024
        rule = "in_features <= 4096 and out_features <= 1024"
    elif recipe == "rowwise":
        small = n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)
        rule = (
            "out_features <= 2048, in_features <= 1024, or out_features <= 4096 and "
            "in_features <= 2048"
        )
    else:
        raise ValueError(f"unknown float8 recipe {recipe!r} (tensorwise or rowwise)")
    if not small:
        return None
    return (
        f"too small to gain from float8 {recipe}: in/out features ({k}, {n}) match {rule} "
        "(torchao's H100 recipe filter)"
    )


def _skip_reason(
    module: nn.Linear, fqn: str, section: Float8Section, size_filter: bool
) -> str | None:
    for pattern in section.skip_patterns:
        if fnmatch.fnmatchcase(fqn, pattern):
            return f"matches skip pattern {pattern!r}"
    if module.in_features % FLOAT8_DIM_MULTIPLE or module.out_features % FLOAT8_DIM_MULTIPLE:
        return (
            f"in/out features ({module.in_features}, {module.out_features}) are not "
            f"multiples of {FLOAT8_DIM_MULTIPLE}"
        )
    if size_filter:
        return float8_too_small_reason(module.in_features, module.out_features, section.recipe)
    return None


def float8_unsupported_reason(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device`` here, or ``None`` when it can.

    Cheap enough to ask before building anything (it imports torchao, which float8
    needs anyway).

    Args:
        device: The device the model will train on (``cpu`` runs torchao's emulation).
    """
    try:
        import torchao.float8  # noqa: F401
    except Exception as err:  # missing, or built against another torch (OSError, ...)
        if isinstance(err, ImportError) and err.name in ("torchao", "torchao.float8"):
            return "float8 training needs torchao, which is not installed (pip install torchao)"
        return f"float8 training needs torchao, which failed to import: {err}"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_CUDA_CAPABILITY:
            return (
                f"float8 training needs a CUDA device of compute capability >= "
                f"{_MIN_CUDA_CAPABILITY[0]}.{_MIN_CUDA_CAPABILITY[1]} (Ada/Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
            )
    return None


def _target_device(model: nn.Module) -> torch.device:
    # A meta model will be materialised on the current CUDA device when there is one.
    device_types = {param.device.type for param in model.parameters()}
    if "cuda" in device_types or ("meta" in device_types and torch.cuda.is_available()):
        return torch.device("cuda")  # no index: the current device
    return torch.device("cpu")


def check_float8_supported(model: nn.Module) -> None:
    """Fails early, with the reason, where float8 training cannot run.

    Args:
        model: The model to convert; its parameters' device decides what is checked (a
            ``meta`` model is checked against the current CUDA device when there is one).

    Raises:
        RuntimeError: If torchao is missing, or the CUDA device is older than sm_89.
    """
    reason = float8_unsupported_reason(_target_device(model))
    if reason is not None:
        raise RuntimeError(reason)


def convert_linears_to_float8(
    model: nn.Module, section: Float8Section, *, size_filter: bool | None = None
) -> Float8Report:
    """Swaps eligible ``nn.Linear`` modules of ``model`` for torchao ``Float8Linear``.

    Skipped: linears matching ``section.skip_patterns`` (the output heads by default),
    linears whose in/out features are not multiples of 16, and (with the size filter)
    linears too small to gain. Skips are logged with their reason.

    Args:
        model: Any module (a whole model or one pipeline stage); changed in place. May
            be on the ``meta`` device.
        section: The ``[float8]`` config (must be enabled).
        size_filter: Skip GEMMs too small to gain (:func:`float8_too_small_reason`).
            ``None``: on when the model trains on CUDA, off on the CPU.

    Returns:
        Which linears were converted and which were skipped.

    Raises:
        RuntimeError: If float8 cannot run here (see :func:`check_float8_supported`).
    """
    assert section.enabled, "float8 conversion called with float8 disabled"
    device = _target_device(model)
    reason = float8_unsupported_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if size_filter is None:
        size_filter = device.type == "cuda"
    report = Float8Report()

    def module_filter(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # torchao asks about containers too; it only swaps linears
        reason = _skip_reason(module, fqn, section, size_filter)
        if reason is None:
            report.converted.append(fqn)
        else:
            report.skipped[fqn] = reason
        return reason is None

    float8_config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(section.recipe),
        enable_fsdp_float8_all_gather=section.enable_fsdp_float8_all_gather,
    )
    convert_to_float8_training(model, module_filter_fn=module_filter, config=float8_config)
    for fqn, reason in report.skipped.items():
        logger.info("float8: kept %s in high precision: %s", fqn, reason)
    logger.info(
        "float8 (%s): converted %d linears, skipped %d",
        section.recipe,
        len(report.converted),
        len(report.skipped),
    )
    return report
