"""float8 size filter: small GEMMs stay in high precision on CUDA, each with its reason."""

import pytest
import torch
from torch import nn

from d9d.compile.config import Float8Section
from d9d.compile.float8 import convert_linears_to_float8, float8_too_small_reason

pytest.importorskip("torchao.float8", reason="float8 conversion needs torchao")


def _projections() -> nn.Module:
    # Qwen3-1.7B's attention shapes (hidden 2048, 16 query / 8 KV heads of 128) and MLP.
    with torch.device("meta"):
        return nn.ModuleDict(
            {
                "q_proj": nn.Linear(2048, 2048, bias=False),
                "k_proj": nn.Linear(2048, 1024, bias=False),
                "up_proj": nn.Linear(2048, 6144, bias=False),
                "down_proj": nn.Linear(6144, 2048, bias=False),
                "odd": nn.Linear(2048, 1000, bias=False),
            }
        )


@pytest.mark.parametrize(
    ("recipe", "in_features", "out_features", "small"),
    [
        ("tensorwise", 1024, 1024, True),  # every Qwen3-0.6B k/v projection
        ("tensorwise", 2048, 1024, True),  # Qwen3-1.7B k/v projections
        ("tensorwise", 4096, 1024, True),
        ("tensorwise", 4097, 1024, False),
        ("tensorwise", 2048, 1040, False),
        ("rowwise", 4096, 2048, True),  # N <= 2048
        ("rowwise", 1024, 8192, True),  # K <= 1024
        ("rowwise", 2048, 4096, True),  # N <= 4096 and K <= 2048
        ("rowwise", 2048, 6144, False),
        ("rowwise", 4096, 4096, False),
    ],
)
def test_torchao_recipe_thresholds(recipe, in_features, out_features, small):
    reason = float8_too_small_reason(in_features, out_features, recipe)
    assert (reason is not None) == small
    if small:
        assert f"({in_features}, {out_features})" in reason and recipe in reason


def test_unknown_recipe_is_a_value_error():
    with pytest.raises(ValueError, match="unknown float8 recipe 'blockwise'"):
        float8_too_small_reason(64, 64, "blockwise")


def test_size_filter_keeps_small_gemms_and_reports_why():
    from torchao.float8.float8_linear import Float8Linear

    model = _projections()
    report = convert_linears_to_float8(model, Float8Section(enabled=True), size_filter=True)
    assert report.converted == ["q_proj", "up_proj", "down_proj"]
    assert set(report.skipped) == {"k_proj", "odd"}
    assert "too small to gain from float8 tensorwise" in report.skipped["k_proj"]
    assert "(2048, 1024)" in report.skipped["k_proj"]
    assert "multiples of 16" in report.skipped["odd"]  # the hardware rule comes first
    assert isinstance(model["up_proj"], Float8Linear)
    assert type(model["k_proj"]) is nn.Linear


def test_without_the_size_filter_only_the_hardware_rule_applies():
    # The default off CUDA (float8 is emulated there and has no speed to gain).
    model = _projections()
    report = convert_linears_to_float8(model, Float8Section(enabled=True))
    assert report.converted == ["q_proj", "k_proj", "up_proj", "down_proj"]
    assert list(report.skipped) == ["odd"]
