"""Split token embeddings: splits laid out contiguously in split_vocab_order."""

import pytest
import torch

from d9d.module.block.embedding import SplitTokenEmbeddings

SIZES = {"alpha": 3, "zeta": 5, "mid": 2}
ORDER = ["zeta", "alpha", "mid"]  # global ids: zeta 0..4, alpha 5..7, mid 8..9


def test_global_ids_map_to_their_split_in_order():
    emb = SplitTokenEmbeddings(SIZES, ORDER, hidden_size=4)
    assert emb.vocab_size == 10
    ids = torch.tensor([[0, 4, 5, 7, 8, 9]])
    out = emb(ids)
    table = emb.token_embedding
    expected = torch.stack(
        [
            table["zeta"].weight[0],
            table["zeta"].weight[4],
            table["alpha"].weight[0],
            table["alpha"].weight[2],
            table["mid"].weight[0],
            table["mid"].weight[1],
        ]
    )
    assert torch.equal(out[0], expected)


def test_gradient_reaches_only_the_looked_up_rows():
    emb = SplitTokenEmbeddings(SIZES, ORDER, hidden_size=4)
    emb(torch.tensor([[6, 6, 1]])).sum().backward()
    grads = {name: e.weight.grad for name, e in emb.token_embedding.items()}
    assert torch.equal(grads["alpha"][1], torch.full((4,), 2.0))
    assert torch.equal(grads["zeta"][1], torch.ones(4))
    assert grads["alpha"].abs().sum() == 8 and grads["zeta"].abs().sum() == 4
    assert grads["mid"] is None or grads["mid"].abs().sum() == 0


@pytest.mark.parametrize("splits", [(SIZES, ORDER), ({"only": 10}, ["only"])])
@pytest.mark.parametrize("bad", [10, 11, -1, 12345])
def test_ids_outside_every_split_raise_naming_the_value(splits, bad):
    emb = SplitTokenEmbeddings(*splits, hidden_size=4)
    ids = torch.tensor([[0, bad, 3]])
    with pytest.raises(ValueError, match=rf"input_ids.*(?<![\d-]){bad}(?!\d)"):
        emb(ids)


def test_reset_parameters_is_standard_normal():
    emb = SplitTokenEmbeddings({"a": 400, "b": 300}, ["b", "a"], hidden_size=16)
    for e in emb.token_embedding.values():
        e.weight.data.zero_()
    emb.reset_parameters()
    for e in emb.token_embedding.values():
        assert 0.9 < e.weight.std().item() < 1.1
        assert abs(e.weight.mean().item()) < 0.05
