"""float8 training linears through torchao.

Where float8 is decided: :func:`convert_linears_to_float8` swaps each eligible
``nn.Linear`` for torchao's ``Float8Linear`` (same parameter names, so checkpoints are
unaffected) and reports the ones it left in high precision and why.

Eligible means: not matched by a skip pattern, both dims multiples of 16 (what float8
GEMMs need), and, where float8 GEMMs are native, big enough to gain. A float8 linear pays
for casting its input, weight and output gradient (and their amaxes) on every step; on a
small GEMM that costs more than the faster matmul saves, so small projections run
*slower* in float8. The size thresholds are torchao's own recipe filters, measured on
H100 (``torchao.float8._auto_filter_for_recipe``): tensorwise converts unless
``in_features <= 4096 and out_features <= 1024``; rowwise needs ``out_features > 2048``,
``in_features > 1024`` and not (``out_features <= 4096 and in_features <= 2048``).

Where the device has no float8 GEMM (:func:`has_float8_gemm`: every CPU on torch 2.13,
CUDA below compute capability 8.9), the converted linears run emulated
(``d9d.compile.float8_emulated``): the recipe's casts and scales, GEMMs in the compute
dtype. There float8 has no speed to gain, so only the hardware rule applies (tests
convert tiny linears on purpose).

torchao is imported only here, inside the functions, and only when float8 is asked for:
importing ``d9d`` must not load torchao's compiled extensions.
"""

import dataclasses
import fnmatch
import functools
import logging

import torch
from torch import nn

from d9d.compile.config import Float8Section
from d9d.core.log_filters import dropping_log_records
from d9d.metrics.timers import DeviceClock

logger = logging.getLogger(__name__)

FLOAT8_DIM_MULTIPLE = 16
"""float8 GEMMs (``torch._scaled_mm``) need both matrix dims to be multiples of 16."""

_MIN_CUDA_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores

EMULATED_GEMMS = "emulated: no float8 GEMM on this device"
"""How reports name float8 that runs on emulated GEMMs (``Float8Report.gemms``)."""
NATIVE_GEMMS = "native float8 GEMMs"
"""How reports name float8 that runs on the device's float8 GEMMs."""


def is_float8_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a torchao float8 training linear (without importing torchao).

    torchao's ``Float8Linear`` or a subclass of it (the emulated one included).
    """
    return any(cls.__name__ == "Float8Linear" for cls in type(module).__mro__)


@dataclasses.dataclass
class Float8Report:
    """What the float8 conversion did.

    Attributes:
        converted: FQNs of the linears now running in float8, in module order.
        skipped: FQN -> reason, for every ``nn.Linear`` left in high precision.
        emulated: Whether the converted linears run emulated GEMMs (the device has no
            float8 GEMM).
    """

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    emulated: bool = False

    @property
    def gemms(self) -> str:
        """``"emulated: no float8 GEMM on this device"`` or ``"native float8 GEMMs"``."""
        return EMULATED_GEMMS if self.emulated else NATIVE_GEMMS


def import_torchao_float8():
    """Imports ``torchao.float8`` without the lines torchao's import prints.

    torchao's wheel carries compiled extensions for other kernels (MX formats, CUTLASS
    for sm_90a) built for a particular Python and CUDA; where they do not load, its
    import logs ``Failed to load ... .so`` for each. float8 training uses none of them
    (it is PyTorch ops plus ``torch._scaled_mm``). The same import registers an Enum as
    a pytree constant, which torch 2.13 reports as deprecated: compile treats enums
    natively now. Both lines are dropped, during this import only.

    Returns:
        The ``torchao.float8`` module.
    """
    with (
        dropping_log_records("torchao", r"^Failed to load .*\.so"),
        dropping_log_records(
            "torch.utils._pytree", r"is an Enum subclass and is now natively supported"
        ),
    ):
        import torchao.float8
    return torchao.float8


def _cuda_has_float8_gemm(device: torch.device) -> bool:
    if torch.version.hip is not None:
        # ROCm reports gfx versions, not CUDA capabilities: ask the kernel itself.
        return measure_float8_gemm_is_fast(device)
    return torch.cuda.get_device_capability(device) >= _MIN_CUDA_CAPABILITY


def has_float8_gemm(device: torch.device) -> bool:
    """Whether ``device`` multiplies float8 natively; if not, float8 linears are emulated.

    Decided by capability, never by a product name:

    * CUDA: compute capability >= 8.9 (Ada, Hopper and newer have float8 tensor cores).
    * ROCm: the capability numbers do not say; one measurement (cached per device)
      compares ``torch._scaled_mm`` with a bf16 GEMM (:func:`measure_float8_gemm_is_fast`).
    * CPU: no. torch 2.13's CPU ``torch._scaled_mm`` has no float8 GEMM kernel for any
      CPU; it runs a slow fallback (0.06 GFLOP/s measured on an Intel Xeon with AMX,
      4.5 GFLOP/s on an AMD EPYC with avx512_bf16 whose bf16 GEMMs reach 0.9 TFLOP/s).

    Args:
        device: The device the model trains on.
    """
    if device.type == "cuda":
        return _cuda_has_float8_gemm(device)
    return False


@functools.cache
def _measured_float8_gemm_is_fast(device: torch.device) -> bool:
    side = 1024 if device.type != "cpu" else 256
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16).t()
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)

    clock = DeviceClock(device)  # synchronises CUDA before each reading

    def seconds(fn) -> float:
        fn()  # warm-up (kernel selection, caches)
        best = float("inf")
        for _ in range(3):
            start = clock.now()
            fn()
            best = min(best, clock.now() - start)
        return best

    float8 = seconds(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
    bf16 = seconds(lambda: torch.mm(a, b))
    # A native float8 GEMM is about twice as fast as bf16; a fallback is many times slower.
    return float8 <= bf16


def measure_float8_gemm_is_fast(device: torch.device) -> bool:
    """One-shot measurement: is ``torch._scaled_mm`` at least as fast as a bf16 GEMM here?

    For devices whose capability does not tell (ROCm). Runs once per device and process
    (a few milliseconds on a GPU); a device where ``_scaled_mm`` raises has no float8 GEMM.

    Args:
        device: The device to measure.
    """
    try:
        return _measured_float8_gemm_is_fast(device)
    except RuntimeError:
        return False


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
    needs anyway). A device without float8 GEMMs is no reason: float8 runs emulated there.

    Args:
        device: The device the model will train on.
    """
    del device  # every device runs float8, natively or emulated
    try:
        import_torchao_float8()
    except Exception as err:  # missing, or built against another torch (OSError, ...)
        if isinstance(err, ImportError) and err.name in ("torchao", "torchao.float8"):
            return "float8 training needs torchao, which is not installed (pip install torchao)"
        return f"float8 training needs torchao, which failed to import: {err}"
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
        RuntimeError: If torchao is missing or fails to import.
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
    linears too small to gain. Skips are logged with their reason. Where the device has
    no float8 GEMM (:func:`has_float8_gemm`), the converted linears run emulated GEMMs.

    Args:
        model: Any module (a whole model or one pipeline stage); changed in place. May
            be on the ``meta`` device.
        section: The ``[float8]`` config (must be enabled).
        size_filter: Skip GEMMs too small to gain (:func:`float8_too_small_reason`).
            ``None``: on where float8 GEMMs are native, off where they are emulated.

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

    native = has_float8_gemm(device)
    if size_filter is None:
        size_filter = native
    report = Float8Report(emulated=not native)

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
        # torchao's own emulation (fp32 GEMMs) backs any path that does not go through
        # the emulated linear's forward: never the slow float8 fallback kernel.
        emulate=not native,
    )
    convert_to_float8_training(model, module_filter_fn=module_filter, config=float8_config)
    if not native:
        from d9d.compile.float8_emulated import emulate_float8_gemms

        emulate_float8_gemms(model)
    for fqn, reason in report.skipped.items():
        logger.info("float8: kept %s in high precision: %s", fqn, reason)
    logger.info(
        "float8 (%s, %s): converted %d linears, skipped %d",
        section.recipe,
        report.gemms,
        len(report.converted),
        len(report.skipped),
    )
    return report
