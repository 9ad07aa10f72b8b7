"""Context parallelism's single-process pieces: the head-tail split, the batch sharding
and the masks of local queries over gathered keys (SDPA and FlexAttention).

Attention over ``C`` simulated ranks (each rank's queries against the keys of all ranks,
laid out as the all-gather lays them out) is stitched back and compared with one
process's attention over the whole row, packed documents included.
"""

import pytest
import torch
import torch.nn.functional as F

from d9d.module.block.attention import _flex_attention
from d9d.module.block.document_mask import (
    build_sharded_document_mask,
    document_ids_from_position_ids,
    sdpa_document_mask,
)
from d9d.module.parallelism.context_parallel import (
    gathered_indices,
    head_tail_indices,
    shard_batch_for_context_parallel,
)


def test_head_tail_chunks():
    # 8 tokens, 2 ranks: chunks [0,1] [2,3] [4,5] [6,7]; rank 0 takes chunks 0 and 3.
    assert head_tail_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert head_tail_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert head_tail_indices(12, 3, 1).tolist() == [2, 3, 8, 9]
    assert gathered_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    for cp in (1, 2, 4):
        assert sorted(gathered_indices(24, cp).tolist()) == list(range(24))


def test_head_tail_balances_causal_work():
    # Keys each rank's queries see under a causal mask: equal on every rank.
    seq, cp = 32, 4
    work = [int((head_tail_indices(seq, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1, work


def test_shard_batch_keeps_global_positions():
    ids = torch.arange(16).view(2, 8)
    batch = {
        "input_ids": ids,
        "labels": ids + 100,
        "hidden_states_agg_mask": torch.ones(2, 8, dtype=torch.long),
        "row_weight": torch.tensor([1.0, 2.0]),  # per row: unchanged
    }
    shards = [shard_batch_for_context_parallel(batch, r, 2) for r in range(2)]
    assert shards[0]["input_ids"].tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    assert shards[1]["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    # No position_ids in the batch: arange(seq) before sharding, so global positions.
    assert shards[0]["position_ids"].tolist() == [[0, 1, 6, 7]] * 2
    assert shards[1]["position_ids"].tolist() == [[2, 3, 4, 5]] * 2
    assert torch.equal(shards[1]["row_weight"], batch["row_weight"])
    packed = dict(batch, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2))
    assert shard_batch_for_context_parallel(packed, 0, 2)["position_ids"][0].tolist() == [
        0,
        1,
        3,
        4,
    ]
    # One rank: the batch as it is.
    assert shard_batch_for_context_parallel(batch, 0, 1).keys() == batch.keys()


def test_shard_batch_errors():
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    with pytest.raises(
        ValueError, match="sequence length 10 is not divisible by 2 x context-parallel"
    ):
        shard_batch_for_context_parallel(batch, 0, 3)
    with pytest.raises(ValueError, match=r"= 4 \(each row is cut into 4 equal chunks"):
        shard_batch_for_context_parallel({"input_ids": torch.zeros(2, 6)}, 0, 2)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        shard_batch_for_context_parallel({"input_ids": torch.zeros(2, 8)}, 2, 2)
    bad = {"input_ids": torch.zeros(2, 8), "labels": torch.zeros(2, 7)}
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(2, 7\)"):
        shard_batch_for_context_parallel(bad, 0, 2)
    with pytest.raises(ValueError, match="needs input_ids"):
        shard_batch_for_context_parallel({"labels": torch.zeros(2, 8)}, 0, 2)


# Two rows of 16: one document; and documents crossing the chunk (4 tokens) and the rank
# boundaries, a continuation chunk starting at 40, a one-token document.
POSITIONS = torch.tensor(
    [
        list(range(16)),
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 40, 41, 0],
    ]
)


def _qkv(seq, heads=4, kv_heads=2, dim=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, seq, dim, generator=gen)
    k = torch.randn(2, kv_heads, seq, dim, generator=gen)
    v = torch.randn(2, kv_heads, seq, dim, generator=gen)
    return q, k, v


def _long_positions() -> torch.Tensor:
    # 512 tokens (4 chunks of 128 at cp=2): documents of 100, 200, 50 and 162 tokens cross
    # the chunk boundaries at 128 (also the rank boundary), 256 and 384.
    row = torch.cat([torch.arange(n) for n in (100, 200, 50, 162)])
    return torch.stack([torch.arange(512), row])


def _context_parallel_attention(q, k, v, cp, backend, positions=POSITIONS):
    """Every simulated rank's local attention, written back to its tokens' slots."""
    seq = q.shape[2]
    docs = document_ids_from_position_ids(positions)
    kv_index = gathered_indices(seq, cp)
    out = torch.zeros_like(q)
    for rank in range(cp):
        q_index = head_tail_indices(seq, cp, rank)
        mask = build_sharded_document_mask(
            q_index, kv_index, docs[:, q_index], docs[:, kv_index], backend
        )
        q_local, k_all, v_all = q[:, :, q_index], k[:, :, kv_index], v[:, :, kv_index]
        if backend == "sdpa":
            local = F.scaled_dot_product_attention(
                q_local, k_all, v_all, attn_mask=mask, enable_gqa=True
            )
        else:
            # The model's own call: compiled FlexAttention, q and k/v padded to the mask.
            local = _flex_attention(q_local, k_all, v_all, mask, q.shape[-1] ** -0.5, True)
        out[:, :, q_index] = local
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_sdpa_sharded_mask_equals_one_process(cp):
    q, k, v = _qkv(16)
    expected = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=sdpa_document_mask(document_ids_from_position_ids(POSITIONS)),
        enable_gqa=True,
    )
    got = _context_parallel_attention(q, k, v, cp, "sdpa")
    # fp32, the same softmax over the same keys in another order: rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sharded_mask_rows_are_those_of_the_full_mask():
    docs = document_ids_from_position_ids(POSITIONS)
    full = sdpa_document_mask(docs)[:, 0]
    kv_index = gathered_indices(16, 2)
    for rank in range(2):
        q_index = head_tail_indices(16, 2, rank)
        mask = build_sharded_document_mask(
            q_index, kv_index, docs[:, q_index], docs[:, kv_index], "sdpa"
        )
        assert torch.equal(mask[:, 0], full[:, q_index][:, :, kv_index])


@torch.no_grad()
def test_flex_sharded_block_mask_forward_on_cpu():
    # torch 2.13 has FlexAttention's forward on the CPU (no backward): the (local queries x
    # all keys) BlockMask gives the one-process result, with whole blocks skipped ...
    positions = _long_positions()
    q, k, v = _qkv(512)
    docs = document_ids_from_position_ids(positions)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_document_mask(docs), enable_gqa=True
    )
    got = _context_parallel_attention(q, k, v, 2, "flex", positions)
    # fp32; the fused kernel sums in another order than SDPA's (measured ~1e-6).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    kv_index = gathered_indices(512, 2)
    q_index = head_tail_indices(512, 2, 0)
    mask = build_sharded_document_mask(
        q_index, kv_index, docs[:, q_index], docs[:, kv_index], "flex"
    )
    assert mask.seq_lengths == (256, 512)
    visited = mask.kv_num_blocks[:, 0] + mask.full_kv_num_blocks[:, 0]
    # Row 0 (one document): rank 0's first query block (tokens 0-127) sees 1 key block,
    # its second (tokens 384-511) all 4; packed row 1 skips blocks of other documents.
    assert visited[0].tolist() == [1, 4]
    assert visited[1].tolist() == [1, 2]
    # ... and lengths that are not whole blocks padded (local 8 queries, 16 keys).
    small_q, small_k, small_v = _qkv(16)
    torch.testing.assert_close(
        _context_parallel_attention(small_q, small_k, small_v, 2, "flex"),
        _context_parallel_attention(small_q, small_k, small_v, 2, "sdpa"),
        rtol=1e-4,
        atol=1e-5,
    )


def test_flex_refused_for_training_on_cpu():
    index = torch.arange(4)
    docs = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        build_sharded_document_mask(index, index, docs, docs, "flex")
