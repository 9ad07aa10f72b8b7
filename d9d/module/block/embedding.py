"""Token embeddings split into named vocabulary segments."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from d9d.core.checks import check_token_range


class SplitTokenEmbeddings(nn.Module):
    """One ``nn.Embedding`` per vocabulary split, laid out contiguously in ``split_order``.

    Global id ``i`` belongs to the split whose range ``[offset, offset + size)`` holds it.

    Args:
        split_vocab_size: Size of each named split.
        split_order: Order of the splits in the global id space.
        hidden_size: Embedding width.
    """

    def __init__(self, split_vocab_size: dict[str, int], split_order: list[str], hidden_size: int):
        super().__init__()
        self.split_order = list(split_order)
        self.split_sizes = [split_vocab_size[name] for name in self.split_order]
        self.vocab_size = sum(self.split_sizes)
        self.token_embedding = nn.ModuleDict(
            {name: nn.Embedding(split_vocab_size[name], hidden_size) for name in self.split_order}
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Looks up ``input_ids`` ``(B, S)``; ids outside the vocabulary raise ``ValueError``."""
        check_token_range(input_ids, self.vocab_size, "input_ids")
        if isinstance(self.token_embedding[self.split_order[0]].weight, DTensor):
            return self._vocab_parallel_forward(input_ids)
        if len(self.split_order) == 1:
            return self.token_embedding[self.split_order[0]](input_ids)
        out = None
        offset = 0
        for name, size in zip(self.split_order, self.split_sizes, strict=True):
            local = input_ids - offset
            inside = (local >= 0) & (local < size)
            emb = self.token_embedding[name](local.clamp(0, size - 1))
            out = emb if out is None else torch.where(inside.unsqueeze(-1), emb, out)
            offset += size
        return out

    def _vocab_parallel_forward(self, input_ids: torch.Tensor) -> DTensor:
        # Tensor parallelism: every split's rows (vocabulary) are sharded over the mesh.
        # Each rank looks up the ids its rows hold (zeros elsewhere); the sum over ranks
        # is one reduce-scatter, leaving the output sharded on the sequence dimension.
        weight = self.token_embedding[self.split_order[0]].weight
        mesh = weight.device_mesh
        rank = mesh.get_local_rank()
        out = None
        offset = 0
        for name, size in zip(self.split_order, self.split_sizes, strict=True):
            local_weight = self.token_embedding[name].weight.to_local()
            rows = local_weight.shape[0]
            local = input_ids - (offset + rank * rows)
            inside = (local >= 0) & (local < rows)
            emb = F.embedding(local.clamp(0, rows - 1), local_weight)
            emb = emb * inside.unsqueeze(-1).to(emb.dtype)
            out = emb if out is None else out + emb
            offset += size
        partial = DTensor.from_local(out, mesh, [Partial()], run_check=False)
        return partial.redistribute(mesh, [Shard(1)])

    def reset_parameters(self) -> None:
        """Re-initialises every split (``nn.Embedding`` default: N(0, 1))."""
        for emb in self.token_embedding.values():
            emb.reset_parameters()
