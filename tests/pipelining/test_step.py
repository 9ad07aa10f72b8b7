"""The single-stage step object: the same loss normalisation as the pipeline schedule."""

import pytest
import torch

from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import SingleStageSchedule, build_schedule
from d9d.stack import build_stage_modules
from tests.helpers import build, randomize_, small_causal_lm_params

BATCH, SEQ = 4, 8


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (BATCH, SEQ + 1), generator=gen)
    labels = ids[:, 1:].clone()
    # Microbatches of unequal valid-token counts: a per-microbatch mean would be wrong.
    labels[0, 2:] = -100
    labels[3, 5:] = -100
    return {"input_ids": ids[:, :-1].contiguous(), "labels": labels}


def _model():
    torch.manual_seed(0)
    model = build(Qwen3DenseForCausalLM, small_causal_lm_params(num_hidden_layers=2))
    model.reset_parameters()
    return randomize_(model)


def _reference(model, batch):
    logps = model(**batch)["logps"]
    loss = logps.sum() / (batch["labels"] != -100).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logps.detach(), grads


@pytest.mark.parametrize("n_microbatches", [1, 2, 4])
def test_step_equals_the_global_mean_over_microbatches(n_microbatches):
    model, batch = _model(), _batch()
    ref_loss, ref_logps, ref_grads = _reference(model, batch)
    schedule = SingleStageSchedule(model, CausalLMLoss(), n_microbatches=n_microbatches)
    result = schedule.step(batch, return_outputs=True)
    assert result.num_items.item() == (batch["labels"] != -100).sum().item()
    torch.testing.assert_close(result.loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.outputs["logps"], ref_logps, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-5, atol=1e-7)


def test_eval_is_forward_only_and_matches_step():
    model, batch = _model(), _batch()
    ref_loss, _, _ = _reference(model, batch)
    schedule = SingleStageSchedule(model, CausalLMLoss(), n_microbatches=2)
    result = schedule.eval(batch)
    torch.testing.assert_close(result.loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert not result.loss.requires_grad
    assert all(p.grad is None for p in model.parameters()), "eval must not touch gradients"


def test_build_schedule_through_the_stack_picks_the_single_stage():
    params = small_causal_lm_params(num_hidden_layers=2)
    stack = build_stage_modules(params, None, seed=0)
    batch = _batch()
    schedule = build_schedule(
        stack.dist_context, stack.modules, stack.infos, batch, 2, CausalLMLoss()
    )
    assert isinstance(schedule, SingleStageSchedule) and schedule.has_last_stage
    assert torch.isfinite(schedule.step(batch).loss)
    with pytest.raises(ValueError, match=r"batch size 2 does not match the schedule's"):
        schedule.step({k: v[:2] for k, v in batch.items()})


def test_bad_batches_are_refused_before_running():
    schedule = SingleStageSchedule(_model(), CausalLMLoss(), n_microbatches=3)
    batch = _batch()
    with pytest.raises(ValueError, match=r"batch size 4 does not split into n_microbatches=3"):
        schedule.step(batch)
    with pytest.raises(ValueError, match=r"the batch has no \['labels'\]"):
        schedule.eval({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="n_microbatches must be >= 1, got 0"):
        SingleStageSchedule(_model(), CausalLMLoss(), n_microbatches=0)


def test_eval_leaves_fsdp_units_sharded_with_their_gradients():
    # Mixed precision runs FSDP2 on a world of one; the head unit keeps its parameters
    # after forward, which only a backward (or eval's reshard) frees again.
    from d9d.compile import CompileConfig

    mixed = CompileConfig(fsdp={"param_dtype": "float32", "reduce_dtype": "float32"})
    stack = build_stage_modules(small_causal_lm_params(num_hidden_layers=2), mixed, seed=0)
    batch = _batch()
    schedule = build_schedule(
        stack.dist_context, stack.modules, stack.infos, batch, 2, CausalLMLoss()
    )
    schedule.step(batch)
    before = {name: p.grad.clone() for name, p in stack.modules[0].named_parameters()}
    schedule.eval(batch)
    after = dict(stack.modules[0].named_parameters())
    assert before.keys() == after.keys()
    for name, grad in before.items():
        assert after[name].grad is not None and torch.equal(after[name].grad, grad), name
