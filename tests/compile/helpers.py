"""Small models, training steps and measurements shared by the compile tests."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.pipelining.api import PipelineStageInfo
from tests.conftest import small_causal_lm_params

VOCAB = 96  # the conftest's two splits: 80 + 16

# intermediate_size 72 is not a multiple of 16, so the MLP linears (and the LM head, by
# name) must stay in high precision under float8 while q/k/v/o are converted: one model
# checks both sides of the float8 filter, and compiles faster with fewer float8 linears.
TINY = dict(hidden_size=64, intermediate_size=72, num_attention_heads=4, head_dim=16)


def build_causal_lm(num_layers: int, enable_checkpointing: bool = False, device=None):
    """A seeded tiny causal LM (same weights for the same ``num_layers``)."""
    torch.manual_seed(1234)
    with torch.device(device or "cpu"):
        return Qwen3DenseForCausalLM(
            small_causal_lm_params(num_hidden_layers=num_layers, **TINY),
            PipelineStageInfo(0, 1),
            "no",
            enable_checkpointing,
        )


def make_batch(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(input_ids, labels)``, already shifted, with one ignored label."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)
    labels = ids[:, 1:].clone()
    labels[0, 0] = -100
    return ids[:, :-1], labels


def train_step(model, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One forward/backward; returns the loss and a copy of every gradient by name."""
    model.zero_grad(set_to_none=True)
    input_ids, labels = make_batch(batch, seq, seed)
    logps = model(input_ids=input_ids, labels=labels)["logps"]
    loss = logps[labels != -100].mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


class SavedActivationBytes(TorchDispatchMode):
    """Counts the bytes of tensors created during a forward that are still alive after it.

    These are what autograd (or a checkpoint) keeps for the backward. Storages are tracked
    through weak references, so nothing is kept alive by the measurement itself.
    """

    def __init__(self):
        super().__init__()
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                self._storages[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        """Bytes of tracked storages still alive, skipping the data pointers in ``exclude``."""
        return sum(
            nbytes
            for ptr, (ref, nbytes) in self._storages.items()
            if ref() is not None and ptr not in exclude
        )
