"""The one builder: order, layout-independent initialisation, mixed precision, init modes."""

import subprocess
import sys
import textwrap

import pytest
import torch

from d9d.compile import CompileConfig, load_compile_config
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseForClassification
from d9d.stack import build_stage_modules
from tests.helpers import TINY, make_batch, small_causal_lm_params, small_classification_params


def test_same_seed_same_weights_whatever_the_pipeline_split():
    params = small_causal_lm_params(num_hidden_layers=4)
    whole = build_stage_modules(params, seed=7).modules[0].state_dict()
    split = build_stage_modules(params, num_stages_per_rank=3, seed=7)
    assert [i.current_stage for i in split.infos] == [0, 1, 2]
    seen = set()
    for module in split.modules:
        for key, value in module.state_dict().items():
            assert torch.equal(value, whole[key]), key
            seen.add(key)
    assert seen == set(whole)
    other_seed = build_stage_modules(params, seed=8).modules[0].state_dict()
    assert not torch.equal(
        other_seed["model.layers.2.mlp.up_proj.weight"], whole["model.layers.2.mlp.up_proj.weight"]
    )
    # Each layer draws from its own stream: no two layers start equal.
    assert not torch.equal(
        whole["model.layers.0.self_attn.q_proj.weight"],
        whole["model.layers.1.self_attn.q_proj.weight"],
    )


def test_initialisation_follows_pytorch_defaults_and_rebuilds_rope():
    params = small_causal_lm_params(num_hidden_layers=2)
    (model,) = build_stage_modules(params).modules
    state = model.state_dict()
    assert torch.equal(state["model.norm.weight"], torch.ones(64))
    assert torch.equal(state["model.layers.1.self_attn.q_norm.weight"], torch.ones(16))
    bound = 64**-0.5  # nn.Linear's kaiming-uniform bound for fan_in 64
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert q.abs().max() <= bound and q.std() > bound / 3
    emb = state["model.embed_tokens.token_embedding.text.weight"]
    assert 0.8 < emb.std() < 1.2  # N(0, 1)
    rope = model.model.rotary_emb
    assert torch.isfinite(rope.cos).all() and torch.equal(rope.cos[0], torch.ones(16))


def test_applies_the_preset_and_returns_reports():
    params = small_causal_lm_params(num_hidden_layers=2, **TINY)
    config = CompileConfig(
        name="test",
        compile={"enabled": True, "backend": "eager"},
        activation_checkpointing={"mode": "full"},
    )
    stack = build_stage_modules(params, config)
    (report,) = stack.reports
    assert report.steps == ["activation_checkpointing", "compile", "compile_loss"]
    assert stack.compute_dtype == torch.float32 and stack.dist_context is None
    assert stack.has_first_stage and stack.has_last_stage
    input_ids, labels = make_batch(2, 8)
    loss = stack.modules[0](input_ids=input_ids, labels=labels)["logps"].mean()
    loss.backward()
    assert all(p.grad is not None for p in stack.parameters())


def test_classification_and_pure_bf16():
    params = small_classification_params(num_hidden_layers=2)
    stack = build_stage_modules(params, param_dtype=torch.bfloat16)
    (model,) = stack.modules
    assert isinstance(model, Qwen3DenseForClassification)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert stack.compute_dtype == torch.bfloat16
    assert model.model.output_dtype() == torch.bfloat16


def test_init_modes():
    params = small_causal_lm_params(num_hidden_layers=2)
    seen = []
    stack = build_stage_modules(params, init=lambda modules: seen.extend(modules))
    assert seen == stack.modules and isinstance(seen[0], Qwen3DenseForCausalLM)
    with pytest.raises(ValueError, match="neither 'reset'"):
        build_stage_modules(params, init="no-such-folder")
    with pytest.raises(ValueError, match="Qwen3DenseForCausalLMParameters"):
        build_stage_modules(params.model)
    with pytest.raises(ValueError, match="num_stages_per_rank"):
        build_stage_modules(params, num_stages_per_rank=0)


def test_mixed_precision_runs_fsdp2_on_a_world_of_one():
    # A fresh interpreter: the world-of-one process group must not leak into other tests.
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from d9d.compile import CompileConfig
        from d9d.stack import build_stage_modules
        from tests.helpers import make_batch, small_causal_lm_params

        config = CompileConfig.model_validate(
            {"fsdp": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}})
        stack = build_stage_modules(small_causal_lm_params(num_hidden_layers=2), config)
        (model,) = stack.modules
        assert dist.get_world_size() == 1 and stack.dist_context is not None
        assert type(model).__name__ == "FSDPQwen3DenseForCausalLM"
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert stack.compute_dtype == torch.bfloat16
        assert model.model.output_dtype() == torch.bfloat16
        input_ids, labels = make_batch(2, 8)
        out = model(input_ids=input_ids, labels=labels)
        assert out["hidden_states"].dtype == torch.bfloat16
        out["logps"].mean().backward()
        assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_preset_by_name():
    params = small_causal_lm_params(num_hidden_layers=2, **TINY)
    stack = build_stage_modules(params, load_compile_config("eager"))
    assert stack.reports[0].steps == []
