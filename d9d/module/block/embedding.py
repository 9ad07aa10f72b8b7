"""Token embeddings split into named vocabulary segments."""

import torch
from torch import nn

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

    def reset_parameters(self) -> None:
        """Re-initialises every split (``nn.Embedding`` default: N(0, 1))."""
        for emb in self.token_embedding.values():
            emb.reset_parameters()
