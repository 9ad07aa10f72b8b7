"""A compiled AdamW step: one generated kernel over every parameter, the LR a tensor.

Eager AdamW walks the parameters in Python and runs several elementwise kernels per
tensor (or one fused kernel per tensor on the ``fused`` path), re-reading the parameter,
gradient and both moments between them. Compiled, the update of every parameter is one
pass over its four tensors, all parameters in one generated function.

Two things keep it to a single compile for the whole run:

* the learning rate is a graph input, not a constant. A Python-float learning rate is
  baked into the graph and guarded on, so every new value of the schedule would
  recompile. :class:`CompiledAdamW` keeps the schedule's float in ``param_groups`` (so
  LR schedulers, ``state_dict()`` and checkpoints see plain numbers) and hands the
  compiled step a 0-dim tensor holding it, refilled before each step;
* the step function itself is compiled, not ``optimizer.step``: torch's step wrapper
  inserts graph breaks around the update (to run it under ``no_grad``) and a profiler
  range; here the no-grad mode and the hooks stay outside, in eager, and the update is
  one graph (``fullgraph=True``).

Parameters may be FSDP2 DTensor shards: their moments are DTensors too, and the update
is elementwise on the local shards, so it compiles the same way. Such a graph holds the
DeviceMesh, which the AOTAutograd disk cache cannot pickle: it warns once per compile
and compiles anew in each process (a few seconds); that warning is dropped here.
"""

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from d9d.core.log_filters import dropping_log_records

# AdamW's update without torch's step wrappers (no-grad with graph breaks, profiler).
_ADAMW_UPDATE = inspect.unwrap(torch.optim.AdamW.step)


class CompiledAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step`` is one compiled graph.

    Hyperparameters, state, ``state_dict()`` and LR schedulers behave as for
    ``torch.optim.AdamW`` (its single-tensor formula, which the compiler fuses). The
    first ``step`` compiles (seconds); later steps, whatever the learning rate, reuse
    the graph.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (a float; the schedule changes it as usual).
        betas: Moment coefficients.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay.
        backend: ``torch.compile`` backend.
        options: Inductor options for the step's compile (``None``: inductor's defaults).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "inductor",
        options: dict[str, Any] | None = None,
    ):
        if isinstance(lr, torch.Tensor):
            raise ValueError("CompiledAdamW takes lr as a float (it makes the tensor itself)")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False
        )
        self._lr_tensors = [torch.zeros((), dtype=torch.float64) for _ in self.param_groups]
        kwargs: dict[str, Any] = {"backend": backend, "fullgraph": True}
        if options:
            kwargs["options"] = options
        self._compiled_update = torch.compile(_ADAMW_UPDATE, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group`` (the group gets its LR tensor)."""
        super().add_param_group(param_group)
        lr_tensors = getattr(self, "_lr_tensors", None)
        if lr_tensors is not None:  # None while ``__init__`` adds the first groups
            lr_tensors.append(torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter with a gradient (compiled).

        Raises:
            ValueError: If a closure is passed (a compiled step cannot re-run the model).
        """
        if closure is not None:
            raise ValueError("CompiledAdamW.step does not take a closure")
        floats = [group["lr"] for group in self.param_groups]
        try:
            for group, tensor, lr in zip(self.param_groups, self._lr_tensors, floats, strict=True):
                if isinstance(lr, torch.Tensor):
                    raise ValueError(
                        "CompiledAdamW keeps param_groups' lr a float; a tensor lr was set"
                    )
                # float64: the same value eager AdamW computes with (a Python float).
                tensor.fill_(lr)
                group["lr"] = tensor
            with dropping_log_records(
                "torch._functorch._aot_autograd.autograd_cache",
                r"unable to serialize compiled graph: Can't pickle local object "
                r"'WeakValueDictionary",
            ):
                self._compiled_update(self)
        finally:
            for group, lr in zip(self.param_groups, floats, strict=True):
                group["lr"] = lr
        return None


def build_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    compiled: bool = False,
    backend: str = "inductor",
) -> tuple[torch.optim.Optimizer, str]:
    """AdamW: compiled (:class:`CompiledAdamW`), else fused, else foreach.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: Moment coefficients.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay.
        compiled: Compile the step (a compile preset's ``[compile] optimizer``).
        backend: ``torch.compile`` backend of the compiled step.

    Returns:
        The optimizer and a label of the path taken (for reports).
    """
    params = list(params)
    hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if compiled:
        return CompiledAdamW(params, backend=backend, **hyper), "AdamW(compiled)"
    try:
        return torch.optim.AdamW(params, fused=True, **hyper), "AdamW(fused)"
    except (RuntimeError, ValueError):
        # fused needs every parameter on a device/dtype its kernel supports.
        return torch.optim.AdamW(params, foreach=True, **hyper), "AdamW(foreach)"
