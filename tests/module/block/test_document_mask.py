"""Document ids and masks derived from ``position_ids``, and their validation."""

import pytest
import torch

from d9d.module.block.document_mask import (
    FLEX_BLOCK_SIZE,
    AttentionBackend,
    build_document_mask,
    document_ids_from_position_ids,
    flex_document_block_mask,
    resolve_attention_backend,
    sdpa_document_mask,
)
from d9d.module.block.position_ids import any_packed_row, check_position_ids


def positions(*rows):
    return torch.stack([torch.cat([torch.arange(a, a + n) for a, n in row]) for row in rows])


def test_a_document_starts_wherever_positions_do_not_continue_by_one():
    pos = positions([(0, 3), (0, 2), (40, 3)], [(5, 8)])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8], dtype=torch.int32)
    assert torch.equal(document_ids_from_position_ids(pos), expected)
    # A jump backwards or forwards by anything but +1 starts a document too.
    pos = torch.tensor([[3, 4, 4, 6, 5]])
    assert document_ids_from_position_ids(pos).tolist() == [[0, 0, 1, 2, 3]]


def test_sdpa_mask_is_causal_within_each_document():
    ids = document_ids_from_position_ids(positions([(0, 2), (0, 3)]))
    mask = sdpa_document_mask(ids)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


def test_flex_block_mask_skips_blocks_of_other_documents():
    # Two rows of 4 blocks: one document per block (block-diagonal), and one document.
    seq = 4 * FLEX_BLOCK_SIZE
    pos = positions([(0, FLEX_BLOCK_SIZE)] * 4, [(0, seq)])
    block_mask = flex_document_block_mask(document_ids_from_position_ids(pos))
    assert block_mask.seq_lengths == (seq, seq)
    # kv blocks visited per query block (partial + full): 1 each for separate documents,
    # i + 1 for the causal row.
    visited = block_mask.kv_num_blocks[:, 0] + block_mask.full_kv_num_blocks[:, 0]
    assert visited.tolist() == [[1, 1, 1, 1], [1, 2, 3, 4]]
    # Off-diagonal blocks of one document are fully visible: no mask_mod there.
    assert block_mask.full_kv_num_blocks[1, 0].tolist() == [0, 1, 2, 3]
    dense = block_mask.to_dense()[:, 0].bool()
    assert dense[0].equal(torch.eye(4, dtype=torch.bool))


def test_flex_block_mask_pads_to_whole_blocks():
    block_mask = flex_document_block_mask(document_ids_from_position_ids(positions([(0, 24)])))
    assert block_mask.seq_lengths == (FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE)


def test_backend_resolution_and_bad_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_backend("auto", cpu) is AttentionBackend.sdpa
    assert resolve_attention_backend("auto", cuda) is AttentionBackend.flex
    assert resolve_attention_backend("sdpa", cuda) is AttentionBackend.sdpa
    with pytest.raises(ValueError, match=r"one of auto, sdpa, flex.*'xformers'"):
        resolve_attention_backend("xformers", cpu)
    pos = positions([(0, 2), (0, 3)])
    assert build_document_mask(pos, "auto").dtype == torch.bool
    with torch.no_grad():
        assert build_document_mask(pos, "flex").seq_lengths == (128, 128)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        build_document_mask(pos, "flex")


def test_check_position_ids_reports_packing_and_rejects_bad_values():
    assert check_position_ids(positions([(0, 4)], [(7, 4)]), 2, 4, 16) is False
    assert check_position_ids(positions([(0, 2), (0, 2)]), 1, 4, 16) is True
    assert check_position_ids(positions([(0, 2), (0, 2)]), 1, 4, 16, check_values=False) is None
    assert any_packed_row(positions([(0, 2), (0, 2)])) is True
    assert any_packed_row(positions([(3, 4)])) is False
    meta = torch.empty(1, 4, dtype=torch.long, device="meta")
    assert check_position_ids(meta, 1, 4, 16) is None
    with pytest.raises(ValueError, match=r"position_ids shape \(1, 4\).*\(2, 4\)"):
        check_position_ids(positions([(0, 4)]), 2, 4, 16)
    with pytest.raises(ValueError, match="position_ids must be a tensor"):
        check_position_ids([[0, 1]], 1, 2, 16)
    with pytest.raises(ValueError, match=r"position_ids must be int64 or int32.*float"):
        check_position_ids(torch.zeros(1, 4), 1, 4, 16, check_values=False)
    with pytest.raises(ValueError, match=r"position_ids must be non-negative.*-2"):
        check_position_ids(torch.tensor([[0, -2]]), 1, 2, 16)
    with pytest.raises(ValueError, match=r"position_ids must be < max_position_ids=16.*16"):
        check_position_ids(torch.tensor([[15, 16]]), 1, 2, 16)
