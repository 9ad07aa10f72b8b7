"""Constants shared by the model, the losses and the data pipeline."""

from typing import Final

IGNORE_INDEX: Final[int] = -100
"""Label value that marks a position (or row) excluded from the loss."""
