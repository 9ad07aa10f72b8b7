"""Several presets in one run: skipped and out-of-memory rows, garbage between configs."""

import dataclasses
import gc
import math
import sys
import weakref

import pytest
import torch

from d9d.compile import CompileConfig
from d9d.metrics.peak import PeakFlops
from d9d.module.model.qwen3_dense.presets import get_model_preset
from d9d.profiling.benchmark import BenchmarkSpec, HarnessTrainer, iter_configs
from d9d.profiling.report import ProfileRecord, SkippedRecord, format_table

PEAK = PeakFlops(1e12, "float32", "test peak", measured=False)
# Compiled with the "eager" backend: Module.compile's reference cycle without inductor.
COMPILED = CompileConfig(name="compiled", compile={"enabled": True, "backend": "eager"})
EAGER = CompileConfig(name="eager")


@pytest.fixture(scope="module")
def spec():
    return BenchmarkSpec(
        model_preset="tiny",
        params=get_model_preset("tiny").parameters(),
        batch_size=1,
        seq_len=8,
        steps=1,
        warmup=1,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def _run(spec, configs, make_trainer, **kwargs):
    return list(
        iter_configs(spec, configs, make_trainer, lambda c: PEAK, log=lambda _: None, **kwargs)
    )


@pytest.fixture
def no_automatic_gc():
    # Only the harness's own collection may free the cycles this test looks at.
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _layer_refs(trainer) -> list[weakref.ref]:
    # Module.compile ties each compiled layer into a reference cycle (the layer holds its
    # compiled call, which holds the layer): the layers and their weights are what leak.
    layer = trainer.module.model.layers["0"]
    return [weakref.ref(layer), weakref.ref(layer.mlp.up_proj.weight)]


def test_compiled_layers_outlive_their_last_reference_without_a_collection(spec, no_automatic_gc):
    # The premise of the next test: without gc.collect() the weights stay alive after
    # the trainer is dropped.
    trainer = HarnessTrainer(spec, COMPILED)
    refs = _layer_refs(trainer)
    del trainer
    assert all(ref() is not None for ref in refs)
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_the_previous_config_is_collected_before_the_next_is_built(spec, no_automatic_gc):
    refs: list[weakref.ref] = []
    alive_when_built: list[list[bool]] = []

    def make_trainer(config):
        alive_when_built.append([ref() is not None for ref in refs])
        trainer = HarnessTrainer(spec, config)
        refs.extend(_layer_refs(trainer))
        return trainer

    records = _run(spec, [COMPILED, COMPILED, EAGER], make_trainer)
    assert [r.status for r in records] == ["ok", "ok", "ok"]
    # When each config was built, no earlier model or optimizer was alive any more.
    assert alive_when_built == [[], [False, False], [False] * 4]
    assert all(ref() is None for ref in refs)  # the last one too, once it finished


def test_unsupported_configs_are_skipped_rows_with_the_reason(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # torchao import now fails
    monkeypatch.delattr(torch.autograd.graph, "region_activation_memory_budget", raising=False)
    float8 = CompileConfig(name="with_float8", float8={"enabled": True})
    budget = CompileConfig(
        name="budget",
        compile={"enabled": True},
        activation_checkpointing={"mode": "memory_budget"},
    )
    built = []

    def make_trainer(config):
        built.append(config.name)
        return HarnessTrainer(spec, config)

    records = _run(spec, [float8, EAGER, budget], make_trainer)
    assert built == ["eager"]  # the skipped ones were never built
    skipped_f8, ok, skipped_budget = records
    assert isinstance(skipped_f8, SkippedRecord) and skipped_f8.status == "skipped"
    assert "needs torchao" in skipped_f8.reason and skipped_f8.float8
    assert isinstance(ok, ProfileRecord) and ok.status == "ok"
    assert skipped_budget.status == "skipped" and "torch >= 2.13" in skipped_budget.reason
    table = format_table(records)
    assert "| with_float8" in table and "| eager" in table
    assert "skipped: with_float8: float8 training needs torchao" in table


class _OutOfMemoryTrainer:
    def __init__(self, spec, config):
        self.inner = HarnessTrainer(spec, config)
        self.module, self.optimizers = self.inner.module, self.inner.optimizers

    def forward_backward(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def optimizer_step(self):
        self.inner.optimizer_step()


def test_out_of_memory_and_failures_are_rows_and_the_next_config_runs(spec, no_automatic_gc):
    refs = []
    failing = CompileConfig(name="failing")

    def make_trainer(config):
        if config.name == "failing":
            raise RuntimeError("something broke\nover two lines")
        trainer = (
            _OutOfMemoryTrainer(spec, config)
            if config.name == "compiled"
            else HarnessTrainer(spec, config)
        )
        refs.extend(_layer_refs(trainer))
        return trainer

    oom, failed, ok = _run(spec, [COMPILED, failing, EAGER], make_trainer)
    assert (oom.status, oom.config) == ("out of memory", "compiled")
    assert "Tried to allocate 9.00 GiB" in oom.reason
    assert (
        failed.status == "failed"
        and failed.reason == "RuntimeError: something broke over two lines"
    )
    assert ok.status == "ok" and ok.config == "eager"
    # The model of the config that ran out of memory did not survive in a traceback.
    assert all(ref() is None for ref in refs)


def test_a_distributed_run_does_not_contain_failures(spec):
    with pytest.raises(torch.OutOfMemoryError):
        _run(spec, [COMPILED], lambda c: _OutOfMemoryTrainer(spec, c), contain_failures=False)


def test_mixed_precision_keeps_fp32_parameters_and_computes_in_bf16(spec):
    mixed = dataclasses.replace(spec, dtype=torch.bfloat16, mixed_precision=True)
    seen = {}

    def make_trainer(config):
        trainer = HarnessTrainer(mixed, config)
        seen["param_dtypes"] = {p.dtype for p in trainer.module.parameters()}
        seen["fsdp"] = type(trainer.module).__name__
        return trainer

    try:
        (record,) = _run(mixed, [EAGER], make_trainer)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert seen["param_dtypes"] == {torch.float32}  # the master weights
    assert seen["fsdp"].startswith("FSDP")  # FSDP2 casts them for compute, on a world of one
    assert record.status == "ok" and record.dtype == "bfloat16"
    assert record.precision == (
        "mixed: float32 parameters and optimizer, bfloat16 compute, float32 reduce"
    )
    assert abs(record.loss_first - math.log(512)) < 1.0
    # Pure bf16 is the other option, labelled as such.
    pure_spec = dataclasses.replace(mixed, mixed_precision=False)
    (pure,) = _run(pure_spec, [EAGER], lambda config: HarnessTrainer(pure_spec, config))
    assert pure.precision.startswith("pure bfloat16")
