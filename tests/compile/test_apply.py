"""apply_compile_config: order, guards against misuse, model kinds, meta init, checkpoints.

These tests compile with backend ``"eager"`` (dynamo tracing only) where the point is
the structure rather than inductor; test_presets.py runs the real presets.
"""

import logging
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from d9d.compile import CompileConfig, apply_compile_config, load_compile_config
from d9d.compile.activation_checkpointing import CheckpointedQwen3DenseLayer
from d9d.module.block.chunked_nll import compiled_nll_kernels
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForClassification,
    Qwen3DenseLayer,
    Qwen3DenseModel,
)
from d9d.pipelining.api import PipelineStageInfo
from tests.helpers import (
    TINY,
    build_causal_lm,
    make_batch,
    small_classification_params,
    small_model_params,
    train_step,
    with_compile_config,
)

# Everything at once, traced by dynamo without inductor.
ALL_STEPS = CompileConfig(
    compile={"enabled": True, "backend": "eager"},
    activation_checkpointing={"mode": "selective"},
    float8={"enabled": True},
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def test_steps_run_and_are_logged_in_order(caplog):
    model = build_causal_lm(2)
    with caplog.at_level(logging.INFO, logger="d9d.compile"):
        report = apply_compile_config(model, ALL_STEPS)
    assert report.steps == ["float8", "activation_checkpointing", "compile", "compile_loss"]
    assert report.num_layers == 2 and report.config is ALL_STEPS
    messages = [r.getMessage() for r in caplog.records]
    order = ["float8 (", "activation checkpointing (", "regional torch.compile", "fused compiled"]
    logged = [next(i for i, m in enumerate(messages) if m.startswith(o)) for o in order]
    assert logged == sorted(logged), messages
    assert model.lm_head.nll_kernels is compiled_nll_kernels(ALL_STEPS.compile.backend)
    assert any(
        "kept lm_head.lm_head.text in high precision" in r.getMessage() for r in caplog.records
    )
    for layer in model.model.layers.values():
        # Still a Qwen3DenseLayer in the ModuleDict (one FSDP2 unit), with the policy and
        # the compiled call inside it.
        assert isinstance(layer, CheckpointedQwen3DenseLayer) and isinstance(layer, Qwen3DenseLayer)
        assert layer.is_compiled and layer.checkpoint_policy is report.checkpoint_policy


@pytest.mark.parametrize(
    ("first", "why"),
    [
        ("compile_sac", "its layers are compiled"),
        (CompileConfig(activation_checkpointing={"mode": "full"}), "its layers are checkpointed"),
        (CompileConfig(float8={"enabled": True}), "it holds float8 linears"),
    ],
)
def test_applying_twice_is_refused(first, why):
    # Read off the model itself: what a config did is visible on its layers and linears.
    first = load_compile_config(first) if isinstance(first, str) else first
    model = with_compile_config(build_causal_lm(2), first)
    with pytest.raises(ValueError, match=rf"already applied to this model \({why}\)"):
        apply_compile_config(model, load_compile_config("compile_sac"))


def test_memory_budget_needs_compile():
    config = CompileConfig(activation_checkpointing={"mode": "memory_budget"})
    with pytest.raises(ValueError, match=r"needs compile\.enabled=true"):
        apply_compile_config(build_causal_lm(2), config)


@pytest.mark.parametrize("preset", ["compile_sac", "compile_full_ac", "compile_memory_budget"])
def test_checkpoint_policy_on_a_self_checkpointing_model_is_refused(preset):
    model = build_causal_lm(2, enable_checkpointing=True)
    with pytest.raises(ValueError, match="enable_checkpointing=True"):
        apply_compile_config(model, load_compile_config(preset))


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="got Linear"):
        apply_compile_config(torch.nn.Linear(4, 4), ALL_STEPS)


def test_float8_below_sm89_is_emulated_and_without_torchao_refused(monkeypatch):
    # A GPU without float8 tensor cores (A100: 8.0) runs float8 emulated, not refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    report = apply_compile_config(build_causal_lm(2, device="meta"), ALL_STEPS)
    assert report.float8.emulated and report.float8.converted
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import now fails
    with pytest.raises(RuntimeError, match="needs torchao"):
        apply_compile_config(build_causal_lm(2), ALL_STEPS)


def test_float8_is_really_used_and_stays_close():
    fp32 = train_step(build_causal_lm(2), 2, 16)
    float8_config = CompileConfig(float8={"enabled": True})
    float8 = train_step(with_compile_config(build_causal_lm(2), float8_config), 2, 16)
    # ~2% error per e4m3 product, mostly averaging out over the loss.
    torch.testing.assert_close(float8[0], fp32[0], rtol=2e-2, atol=0)
    q_grad = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(float8[1][q_grad], fp32[1][q_grad], rtol=1e-3, atol=0)


def test_meta_build_then_to_empty_and_reset_parameters():
    def initialised(model):
        torch.manual_seed(7)
        model.reset_parameters()
        return model

    meta = with_compile_config(build_causal_lm(2, device="meta"), ALL_STEPS)
    meta = initialised(meta.to_empty(device="cpu"))
    reference = with_compile_config(initialised(build_causal_lm(2)), ALL_STEPS.model_copy())
    actual, expected = train_step(meta, 2, 16), train_step(reference, 2, 16)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert sum(counters["graph_break"].values()) == 0
    # RoPE tables are rebuilt by reset_parameters, not left as garbage.
    assert torch.equal(meta.model.rotary_emb.cos, reference.model.rotary_emb.cos)


def test_state_dict_round_trip_between_compiled_and_eager():
    compiled = with_compile_config(build_causal_lm(2), load_compile_config("compile_sac_float8"))
    eager = build_causal_lm(2)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert "model.layers.1.self_attn.q_proj.weight" in compiled.state_dict()

    with torch.no_grad():
        for param in compiled.parameters():
            param.add_(torch.randn_like(param))
    eager.load_state_dict(compiled.state_dict(), strict=True)
    for name, tensor in compiled.state_dict().items():
        assert torch.equal(eager.state_dict()[name], tensor), name

    fresh_eager = build_causal_lm(2)
    fresh_compiled = with_compile_config(build_causal_lm(2), load_compile_config("compile_sac"))
    fresh_compiled.load_state_dict(eager.state_dict(), strict=True)
    fresh_eager.load_state_dict(fresh_compiled.state_dict(), strict=True)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(fresh_eager.state_dict()[name], tensor), name


def test_classification_model_on_a_later_pipeline_stage():
    def build():
        torch.manual_seed(3)
        return Qwen3DenseForClassification(
            small_classification_params(num_hidden_layers=4, **TINY),
            PipelineStageInfo(1, 2),
            "no",
            False,
        )

    model, reference = build(), build()
    report = apply_compile_config(model, ALL_STEPS)
    assert list(model.model.layers) == ["2", "3"]
    hidden = torch.randn(2, 8, TINY["hidden_size"], requires_grad=True)
    outs = [m(hidden_states=hidden)["scores"] for m in (model, reference)]
    # float8 changes numbers; close, not equal.
    torch.testing.assert_close(outs[0], outs[1], rtol=0.1, atol=0.1)
    outs[0].sum().backward()
    assert hidden.grad is not None and sum(counters["graph_break"].values()) == 0
    assert report.float8.skipped["cls_head.score"].startswith("matches")


def test_backbone_alone():
    torch.manual_seed(3)
    model = Qwen3DenseModel(
        small_model_params(num_hidden_layers=2, **TINY),
        PipelineStageInfo(0, 1),
        hidden_states_snapshot_mode="no",
        enable_checkpointing=False,
    )
    report = apply_compile_config(model, ALL_STEPS)
    input_ids, _ = make_batch(2, 8)
    model(input_ids=input_ids)["hidden_states"].sum().backward()
    assert report.num_layers == 2
    assert sum(counters["graph_break"].values()) == 0
    # No head, so no loss kernels: the layer graph only.
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_without_policy_on_a_self_checkpointing_model():
    # enable_checkpointing=True already means "full"; compiling its layers is allowed
    # and the model-level checkpoint then recomputes each compiled layer.
    config = CompileConfig(compile={"enabled": True, "backend": "eager"})
    model = with_compile_config(build_causal_lm(2, enable_checkpointing=True), config)
    actual, expected = train_step(model, 2, 16), train_step(build_causal_lm(2), 2, 16)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0
    # The layer graph plus the two LM-head loss kernels.
    assert counters["stats"]["unique_graphs"] == 3
