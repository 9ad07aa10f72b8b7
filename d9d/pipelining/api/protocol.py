"""The protocol a stage module implements so pipeline schedules can size its buffers."""

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModuleSupportsPipelining(Protocol):
    """A module that knows the shapes it exchanges with neighbouring pipeline stages."""

    def infer_stage_inputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns tensors shaped like what this stage receives for one microbatch.

        Args:
            inputs: The full-batch pipeline inputs (at least ``input_ids``).
            n_microbatches: Number of microbatches the batch is split into.

        Returns:
            Empty or meta tensors with the real shapes and dtypes.
        """
        ...

    def infer_stage_outputs_from_pipeline_inputs(
        self, inputs: dict[str, torch.Tensor], n_microbatches: int
    ) -> dict[str, torch.Tensor]:
        """Returns tensors shaped like what this stage produces for one microbatch.

        Args:
            inputs: The full-batch pipeline inputs (at least ``input_ids``).
            n_microbatches: Number of microbatches the batch is split into.

        Returns:
            Empty or meta tensors with the real shapes and dtypes.
        """
        ...
