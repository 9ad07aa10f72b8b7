"""Protocols shared by every module of the library."""

from typing import Protocol, runtime_checkable


@runtime_checkable
class ModuleLateInit(Protocol):
    """A module that can be built on the ``meta`` device and initialised later.

    The usual flow is ``module = Cls(...)`` under ``torch.device("meta")``, then
    ``module.to_empty(device=...)`` and ``module.reset_parameters()``, which fills every
    parameter and every non-persistent buffer (e.g. RoPE tables).
    """

    def reset_parameters(self) -> None:
        """(Re)initialises all parameters and derived buffers in place."""
        ...
