"""Packed FLOPs convention and ``profiling/mfu.py --packed`` end to end (tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d9d.metrics.flops import packed_training_flops_per_token, training_flops_per_token
from d9d.module.model.qwen3_dense.presets import get_model_preset
from d9d.profiling.packed import sample_document_lengths

REPO = Path(__file__).resolve().parents[2]


def test_packed_flops_count_attention_per_document():
    params = get_model_preset("tiny").parameters()
    # One document of length S is exactly the unpacked count.
    assert packed_training_flops_per_token(params, [64]) == training_flops_per_token(params, 64)
    # Four documents of 16: a quarter of the attention per token, same matmuls.
    quarter = packed_training_flops_per_token(params, [16] * 4)
    full = training_flops_per_token(params, 64)
    assert quarter.matmul == full.matmul
    assert quarter.attention * 4 == full.attention
    # Mixed lengths: sum(n^2) / sum(n) tokens.
    layer = params.model.layer
    per_square = 12 * params.model.num_hidden_layers * layer.num_attention_heads * layer.head_dim
    mixed = packed_training_flops_per_token(params, [1, 3, 60])
    assert mixed.attention == round(per_square * (1 + 9 + 3600) / 64)
    with pytest.raises(ValueError, match="positive lengths"):
        packed_training_flops_per_token(params, [3, 0])


def test_document_lengths_follow_the_stated_distribution():
    lengths = sample_document_lengths(20_000, 512, seed=0)
    assert lengths.min() >= 2 and lengths.max() <= 513
    # Mean seq_len / 8 = 64 before clipping; clipping moves it by a few percent.
    assert 60 < lengths.mean() < 68
    assert np.array_equal(lengths, sample_document_lengths(20_000, 512, seed=0))


def test_mfu_packed_cli_end_to_end(tmp_path):
    out = tmp_path / "packed.json"
    argv = ["--packed", "--model", "tiny", "--config", "eager", "--device", "cpu"]
    argv += ["--seq-len", "64", "--batch-size", "2", "--steps", "2", "--dtype", "float32"]
    argv += ["--peak-tflops", "1", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(REPO / "profiling" / "mfu.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "| eager | packed |" in done.stdout and "document mask" in done.stdout
    data = json.loads(out.read_text())
    by_layout = {r["layout"]: r for r in data["records"]}
    assert set(by_layout) == {"padded", "packed"}
    # A row holds ~8 documents of mean 8 tokens when packed, one when padded.
    assert (
        by_layout["packed"]["slot_efficiency"] > 0.9 > 0.3 > by_layout["padded"]["slot_efficiency"]
    )
    # Fewer attention FLOPs per useful token than one S x S square per row.
    full = training_flops_per_token(get_model_preset("tiny").parameters(), 64).total
    assert by_layout["packed"]["flops_per_useful_token"] < full
    assert data["corpus"]["mask_cost"]["document_mask_ms"] > 0
