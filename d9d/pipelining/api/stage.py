"""Which pipeline stage a module instance represents."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineStageInfo:
    """Position of a module in a pipeline.

    Attributes:
        current_stage: Zero-based index of this stage.
        num_stages: Total number of stages in the pipeline.
    """

    current_stage: int = 0
    num_stages: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if not 0 <= self.current_stage < self.num_stages:
            raise ValueError(
                f"current_stage must be in [0, {self.num_stages}), got {self.current_stage}"
            )

    @property
    def is_current_stage_first(self) -> bool:
        """Whether this stage holds the input embeddings."""
        return self.current_stage == 0

    @property
    def is_current_stage_last(self) -> bool:
        """Whether this stage holds the final norm and the output head."""
        return self.current_stage == self.num_stages - 1
