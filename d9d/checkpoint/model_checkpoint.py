"""Sharded model checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is keyed by the model's unwrapped state-dict names (``model.layers.<i>....``,
``model.norm.weight``, ...), whatever the layout that wrote it: FSDP2 shards, pipeline
stages and the compile layer do not change names. DCP stores each tensor once, with its
global shape, and reshards on load, so a checkpoint saved under one layout (say
``data_parallel_shard=2``) loads under another (say ``pipeline_parallel=2``). Every rank
calls these functions together.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silences DCP's warning that it reads or writes in one process, where that is meant.

    DCP warns on every save and load made without a process group (or with
    ``no_dist=True``), although one process is a supported use. Only that message is
    filtered, and only inside the block; a process group, when there is one, is used as
    usual.
    """
    with warnings.catch_warnings():
        if no_process_group():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def no_process_group() -> bool:
    """Whether this process has no default process group (DCP then runs on it alone)."""
    return not (dist.is_available() and dist.is_initialized())


def _local_state_dict(modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        state = get_model_state_dict(module)
        overlap = merged.keys() & state.keys()
        if overlap:
            raise ValueError(f"stage modules share state-dict keys: {sorted(overlap)[:5]}")
        merged.update(state)
    return merged


def save_model_checkpoint(modules: nn.Module | Sequence[nn.Module], checkpoint_id: str) -> None:
    """Saves the weights of this rank's stage module(s) into one sharded checkpoint.

    Args:
        modules: The stage module, or this rank's stage modules (several with
            interleaved pipelines); plain or FSDP2-sharded.
        checkpoint_id: A directory shared by all ranks.
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    with quiet_single_process():
        dcp.save(_local_state_dict(modules), checkpoint_id=checkpoint_id)


def load_model_checkpoint(modules: nn.Module | Sequence[nn.Module], checkpoint_id: str) -> None:
    """Loads a checkpoint saved under any layout into this rank's stage module(s).

    The modules must be materialised (``to_empty``) and, if wanted, parallelized
    first; only the keys they hold are read. No ``reset_parameters()`` is needed: the
    non-persistent RoPE tables rebuild themselves when a state dict is loaded.

    Args:
        modules: The stage module(s) to fill.
        checkpoint_id: The checkpoint directory.
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    state = _local_state_dict(modules)
    with quiet_single_process():
        dcp.load(state, checkpoint_id=checkpoint_id)
    for module in modules:
        own = get_model_state_dict(module).keys()
        set_model_state_dict(module, {key: state[key] for key in own})
