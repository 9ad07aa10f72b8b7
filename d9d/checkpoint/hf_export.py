"""An HF ``Qwen3ForCausalLM`` folder from a training checkpoint, under any layout.

A training checkpoint holds every stage's weights under their plain names, whatever the
layout that wrote it, so the whole model can be rebuilt from it without the stages.
"""

import os
from pathlib import Path

import torch

from d9d.checkpoint.training import load_model_weights
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseForCausalLMParameters
from d9d.pipelining.api import PipelineStageInfo


def export_hf_from_checkpoint(
    params: Qwen3DenseForCausalLMParameters,
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
) -> Path:
    """Writes the model of a training checkpoint as an HF folder.

    Every rank of a job calls it together: each rebuilds the whole model on the CPU from
    the checkpoint, rank 0 writes the files.

    Args:
        params: The model's parameters (as the run trained it).
        checkpoint: A complete training checkpoint folder (``step-<N>``).
        folder: The HF folder to write.

    Returns:
        The folder written.
    """
    from d9d.module.model.qwen3_dense.hf_io import save_hf_checkpoint

    with torch.device("meta"):
        full = Qwen3DenseForCausalLM(
            params,
            PipelineStageInfo(0, 1),
            hidden_states_snapshot_mode="no",
            enable_checkpointing=False,
        )
    full.to_empty(device="cpu")
    load_model_weights(checkpoint, full)
    save_hf_checkpoint(full, folder)
    return Path(folder)
