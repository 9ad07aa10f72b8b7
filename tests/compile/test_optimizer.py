"""The compiled AdamW step: one graph for the whole run, eager AdamW's numbers."""

import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics

from d9d.compile import CompileConfig
from d9d.compile.optimizer import CompiledAdamW, build_adamw
from d9d.stack import build_stage_modules
from tests.helpers import make_batch, run_spawned, small_causal_lm_params

HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SHAPES = [(48, 32), (32,), (16, 16), (96, 64)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()


def _compile_stats() -> tuple[int, int, int]:
    """(graphs, graph breaks, recompiles) since the fixture's reset."""
    recompiles = sum(1 for m in get_compilation_metrics() if (m.cache_size or 0) > 0)
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), recompiles


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _copy(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _warmup_then_decay(step: int) -> float:
    # A schedule that changes the learning rate at every step (warmup, then decay).
    return (step + 1) / 5 if step < 5 else 5 / (step + 1)


def _train(optimizer, params, steps: int, seed: int = 1) -> None:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=gen).to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def test_twenty_steps_equal_eager_adamw_with_one_compile():
    """fp32, 20 steps of a changing learning rate, against ``torch.optim.AdamW``.

    Not bit-exact: inductor writes eager's ``lerp_`` (the first moment) as ``a + w(b-a)``
    and fuses the update into one expression, so a value may round to the neighbouring
    float (measured: the moments differ by at most 1 ulp, 6e-8). A moment that is off by
    an ulp moves the next update by ~1e-7 of its size (the update is ~lr = 1e-2 here),
    so after 20 steps the parameters (|p| <= 4) stay within a few ulps: 1e-6 absolute
    and relative, 8 ulps at 1.0; a wrong formula (bias correction, decay) is off by >1e-4.
    """
    compiled_params, eager_params = _params(), _params()
    compiled = CompiledAdamW(compiled_params, lr=1e-2, **HYPER)
    eager = torch.optim.AdamW(eager_params, lr=1e-2, foreach=False, **HYPER)
    _train(compiled, compiled_params, 1)
    after_first = _compile_stats()
    assert after_first == (1, 0, 0)  # one graph, no graph break
    _train(compiled, compiled_params, 19, seed=2)
    assert _compile_stats() == after_first  # no recompile while the schedule moved the LR
    _train(eager, eager_params, 1)
    _train(eager, eager_params, 19, seed=2)
    for actual, expected in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        state, eager_state = compiled.state[actual], eager.state[expected]
        torch.testing.assert_close(state["exp_avg"], eager_state["exp_avg"], rtol=0, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], eager_state["exp_avg_sq"])
        assert float(state["step"]) == float(eager_state["step"]) == 20
    assert compiled.param_groups[0]["lr"] == eager.param_groups[0]["lr"]


def test_bf16_update_is_the_fp32_update_rounded_once():
    # Eager bf16 AdamW rounds after every elementwise op; the compiled step keeps fp32
    # intermediates inside its one kernel, so one step equals the fp32 update (on the
    # same bf16 values) rounded to bf16 once: at most half a bf16 ulp apart, 2^-9.
    bf16 = _params(torch.bfloat16)
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in bf16]
    _train(CompiledAdamW(bf16, lr=1e-2, **HYPER), bf16, 1)
    gen = torch.Generator().manual_seed(1)
    for param in fp32:
        param.grad = torch.randn(param.shape, generator=gen).to(torch.bfloat16).float()
    optimizer = torch.optim.AdamW(fp32, lr=1e-2 * _warmup_then_decay(0), foreach=False, **HYPER)
    optimizer.step()
    for actual, expected in zip(bf16, fp32, strict=True):
        assert actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual.float(), expected, rtol=2**-8, atol=0)


def test_state_and_schedule_stay_plain_and_resume_exactly():
    params = _params()
    optimizer = CompiledAdamW(params, lr=1e-2, **HYPER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay)
    _train(optimizer, params, 3)
    # Floats, not tensors, outside the step: schedulers and JSON checkpoints see numbers.
    assert isinstance(optimizer.param_groups[0]["lr"], float)
    json.dumps(scheduler.state_dict())
    resumed_params = _copy(params)
    resumed = CompiledAdamW(resumed_params, lr=1e-2, **HYPER)
    # A copy, as a checkpoint would be (load_state_dict keeps the very tensors it is given).
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(optimizer, params, 2, seed=5)
    _train(resumed, resumed_params, 2, seed=5)
    for actual, expected in zip(resumed_params, params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_bad_use_is_refused():
    params = _params()
    with pytest.raises(ValueError, match="lr as a float"):
        CompiledAdamW(params, lr=torch.tensor(1e-2))
    optimizer = CompiledAdamW(params, lr=1e-2)
    with pytest.raises(ValueError, match="closure"):
        optimizer.step(lambda: 0.0)


def test_build_adamw_labels_the_path():
    assert build_adamw(_params(), lr=1e-3, compiled=True)[1] == "AdamW(compiled)"
    assert build_adamw(_params(), lr=1e-3)[1] == "AdamW(fused)"


@pytest.fixture
def world_of_one():
    # A mixed-precision preset starts a world-of-one process group: stop it afterwards.
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_fsdp2_dtensor_parameters(world_of_one):
    # A mixed-precision preset runs FSDP2 on a world of one: DTensor parameters and moments.
    from torch.distributed.tensor import DTensor

    params = small_causal_lm_params(num_hidden_layers=2)
    config = CompileConfig(fsdp={"param_dtype": "float32", "reduce_dtype": "float32"})
    compiled_model = build_stage_modules(params, config, seed=0).modules[0]
    eager_model = build_stage_modules(params, config, seed=0).modules[0]
    assert isinstance(next(compiled_model.parameters()), DTensor)
    compiled = CompiledAdamW(compiled_model.parameters(), lr=1e-3, **HYPER)
    eager = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, foreach=False, **HYPER)
    input_ids, labels = make_batch(2, 16)
    for step in range(3):
        for model, optimizer in ((compiled_model, compiled), (eager_model, eager)):
            model(input_ids=input_ids, labels=labels)["logps"].mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 0:
            after_first = _compile_stats()
    assert after_first[1:] == (0, 0) and _compile_stats() == after_first
    for actual, expected in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert isinstance(compiled.state[actual]["exp_avg"], DTensor)
        # Same tolerance argument as the plain fp32 test (3 steps, |p| <= ~3).
        torch.testing.assert_close(
            actual.full_tensor(), expected.full_tensor(), rtol=1e-6, atol=1e-6
        )


def test_fsdp2_sharded_over_two_ranks():
    results = run_spawned(2, "tests.compile._optimizer_scenarios:dp_shard_compiled_adamw")
    for result in results:
        assert result["recompiles_after_first_step"] == 0
        assert result["graph_breaks"] == 0
        assert result["max_param_diff"] <= 1e-6, result
