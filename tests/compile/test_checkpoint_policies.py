"""Each checkpoint policy does what it claims, measured in eager mode (no compile).

Backward FLOPs (``FlopCounterMode``) show what is recomputed; the bytes of forward
tensors still alive after the forward show what is kept for the backward.
"""

import pytest
from torch.utils.flop_counter import FlopCounterMode

from d9d.compile import CompileConfig, apply_compile_config
from tests.helpers import SavedActivationBytes, build_causal_lm, make_batch

NUM_LAYERS = 2
POLICIES = {
    "none": {"mode": "none"},
    "selective": {"mode": "selective"},
    "selective_every_other_mm": {"mode": "selective", "save_every_other_matmul": True},
    "full": {"mode": "full"},
}


def _measure(policy: dict) -> dict[str, int]:
    model = build_causal_lm(NUM_LAYERS)
    apply_compile_config(model, CompileConfig(activation_checkpointing=policy))
    input_ids, labels = make_batch(2, 32)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with FlopCounterMode(display=False) as forward_flops, SavedActivationBytes() as saved:
        loss = model(input_ids=input_ids, labels=labels)["logps"].mean()
    kept_bytes = saved.alive_bytes(exclude=param_ptrs)
    with FlopCounterMode(display=False) as backward_flops:
        loss.backward()
    by_module = forward_flops.get_flop_counts()

    def module_flops(suffix: str) -> int:
        return sum(
            sum(by_op.values())
            for name, by_op in by_module.items()
            if name.endswith(tuple(f"layers.{i}{suffix}" for i in range(NUM_LAYERS)))
        )

    return {
        "backward_flops": backward_flops.get_total_flops(),
        "layer_forward_flops": module_flops(""),
        "down_proj_forward_flops": module_flops(".mlp.down_proj"),
        "kept_bytes": kept_bytes,
    }


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, int]]:
    return {name: _measure(policy) for name, policy in POLICIES.items()}


def test_full_recomputes_exactly_the_layer_forwards(measured):
    none, full = measured["none"], measured["full"]
    assert none["down_proj_forward_flops"] > 0
    # Non-reentrant checkpointing stops recomputing once the last tensor the backward
    # needs is back; the output of down_proj (the last matmul) is not needed, so every
    # other op of the forward is recomputed once.
    recomputed = none["layer_forward_flops"] - none["down_proj_forward_flops"]
    assert full["backward_flops"] == none["backward_flops"] + recomputed, measured


def test_selective_recomputes_only_unsaved_ops(measured):
    none, full = measured["none"], measured["full"]
    # Default selective keeps every matmul and attention output: what it recomputes
    # (norms, RoPE, SiLU, products) has no FLOPs in the counter's sense.
    assert measured["selective"]["backward_flops"] == none["backward_flops"], measured
    # Saving every other matmul recomputes the other half: strictly between.
    every_other = measured["selective_every_other_mm"]["backward_flops"]
    assert none["backward_flops"] < every_other < full["backward_flops"], measured


def test_kept_activation_memory_orders_none_selective_full(measured):
    kept = {name: m["kept_bytes"] for name, m in measured.items()}
    assert kept["none"] > kept["selective"] > kept["selective_every_other_mm"] > kept["full"], kept
    assert kept["full"] > 0, kept
