"""float8 training linears through torchao.

Where float8 is decided: :func:`convert_linears_to_float8` swaps each eligible
``nn.Linear`` for torchao's ``Float8Linear`` (same parameter names, so checkpoints are
unaffected) and reports the ones it left in high precision and why.
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


@dataclasses.dataclass
class Float8Report:
    """What the float8 conversion did.

    Attributes:
        converted: FQNs of the linears now running in float8, in module order.
        skipped: FQN -> reason, for every ``nn.Linear`` left in high precision.
    """

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _skip_reason(module: nn.Linear, fqn: str, section: Float8Section) -> str | None:
    for pattern in section.skip_patterns:
        if fnmatch.fnmatchcase(fqn, pattern):
            return f"matches skip pattern {pattern!r}"
    if module.in_features % FLOAT8_DIM_MULTIPLE or module.out_features % FLOAT8_DIM_MULTIPLE:
        return (
            f"in/out features ({module.in_features}, {module.out_features}) are not "
            f"multiples of {FLOAT8_DIM_MULTIPLE}"
        )
    return None


def check_float8_supported(model: nn.Module) -> None:
    """Fails early, with the reason, where float8 training cannot run.

    Args:
        model: The model to convert; its parameters' device decides what is checked (a
            ``meta`` model is checked against the current CUDA device when there is one).

    Raises:
        RuntimeError: If torchao is missing, or the CUDA device is older than sm_89.
    """
    try:
        import torchao.float8  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "float8 training needs torchao, which is not installed (pip install torchao)"
        ) from err
    device_types = {param.device.type for param in model.parameters()}
    on_cuda = "cuda" in device_types or ("meta" in device_types and torch.cuda.is_available())
    if on_cuda:
        capability = torch.cuda.get_device_capability()
        if capability < _MIN_CUDA_CAPABILITY:
            raise RuntimeError(
                f"float8 training needs a CUDA device of compute capability >= "
                f"{_MIN_CUDA_CAPABILITY[0]}.{_MIN_CUDA_CAPABILITY[1]} (Ada/Hopper or newer); "
                f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}"
            )


def convert_linears_to_float8(model: nn.Module, section: Float8Section) -> Float8Report:
    """Swaps eligible ``nn.Linear`` modules of ``model`` for torchao ``Float8Linear``.

    Skipped: linears matching ``section.skip_patterns`` (the output heads by default)
    and linears whose in/out features are not multiples of 16. Skips are logged.

    Args:
        model: Any module (a whole model or one pipeline stage); changed in place. May
            be on the ``meta`` device.
        section: The ``[float8]`` config (must be enabled).

    Returns:
        Which linears were converted and which were skipped.

    Raises:
        RuntimeError: If float8 cannot run here (see :func:`check_float8_supported`).
    """
    assert section.enabled, "float8 conversion called with float8 disabled"
    check_float8_supported(model)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    report = Float8Report()

    def module_filter(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # torchao asks about containers too; it only swaps linears
        reason = _skip_reason(module, fqn, section)
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
