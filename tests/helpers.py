"""Everything the tests share: small parameters, builders, weight randomisation, the HF
config of the same architecture, tolerance helpers and the one way to spawn gloo ranks.

Tests import from here and never from each other. ``transformers`` is imported lazily so
that spawned worker processes, which import their scenario modules, start quickly.
"""

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from d9d.module.block.hidden_states_aggregator import HiddenStatesAggregationMode
from d9d.module.model.qwen3_dense import (
    Qwen3DenseForCausalLM,
    Qwen3DenseForCausalLMParameters,
    Qwen3DenseForClassificationParameters,
    Qwen3DenseLayerParameters,
    Qwen3DenseParameters,
)
from d9d.pipelining.api import PipelineStageInfo

# ---------------------------------------------------------------------------------------
# Parameters and builders

VOCAB = 96  # the default two splits: text 80 + special 16

# intermediate_size 72 is not a multiple of 16, so the MLP linears (and the LM head, by
# name) must stay in high precision under float8 while q/k/v/o are converted: one model
# checks both sides of the float8 filter, and compiles faster with fewer float8 linears.
TINY = dict(hidden_size=64, intermediate_size=72, num_attention_heads=4, head_dim=16)


# The model of the spawned multi-rank scenarios: 4 layers (so 2 pipeline stages of 2),
# tiny enough for gloo on two cores.
DIST_MODEL_KW = dict(
    num_hidden_layers=4,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_ids=32,
)


def small_model_params(
    num_hidden_layers: int = 4,
    split_vocab_size: dict[str, int] | None = None,
    split_vocab_order: list[str] | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    max_position_ids: int = 128,
    **extra,
) -> Qwen3DenseParameters:
    """A tiny backbone; by default two vocab splits in non-alphabetical order."""
    if split_vocab_size is None:
        split_vocab_size = {"text": 80, "special": 16}
        split_vocab_order = ["text", "special"]
    return Qwen3DenseParameters(
        layer=Qwen3DenseLayerParameters(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            rms_norm_eps=1e-6,
            head_dim=head_dim,
        ),
        num_hidden_layers=num_hidden_layers,
        rope_base=10000,
        max_position_ids=max_position_ids,
        split_vocab_size=split_vocab_size,
        split_vocab_order=split_vocab_order or list(split_vocab_size),
        **extra,
    )


def small_causal_lm_params(**kwargs) -> Qwen3DenseForCausalLMParameters:
    """``small_model_params`` wrapped for the causal LM."""
    return Qwen3DenseForCausalLMParameters(model=small_model_params(**kwargs))


def small_classification_params(
    num_labels: int = 3, **kwargs
) -> Qwen3DenseForClassificationParameters:
    """``small_model_params`` wrapped for classification (no dropout)."""
    return Qwen3DenseForClassificationParameters(
        model=small_model_params(**kwargs), num_labels=num_labels, classifier_dropout=0.0
    )


def kind_params(kind: str, num_labels: int = 3, **kwargs):
    """``small_*_params`` of a model kind: ``"causal_lm"`` or ``"classification"``."""
    if kind == "causal_lm":
        return small_causal_lm_params(**kwargs)
    return small_classification_params(num_labels=num_labels, **kwargs)


def kind_model_cls(kind: str):
    """The model class of a kind: ``"causal_lm"`` or ``"classification"``."""
    from d9d.module.model.qwen3_dense import Qwen3DenseForClassification

    return Qwen3DenseForCausalLM if kind == "causal_lm" else Qwen3DenseForClassification


def build(
    cls,
    params,
    stage: PipelineStageInfo | None = None,
    mode: HiddenStatesAggregationMode | str = HiddenStatesAggregationMode.no,
    enable_checkpointing: bool = False,
):
    """Builds ``cls`` (a Qwen3 Dense model class) for ``stage`` (one stage by default)."""
    return cls(
        params=params,
        stage=stage or PipelineStageInfo(0, 1),
        hidden_states_snapshot_mode=HiddenStatesAggregationMode(mode),
        enable_checkpointing=enable_checkpointing,
    )


def build_causal_lm(num_layers: int, enable_checkpointing: bool = False, device=None):
    """A seeded tiny causal LM of ``TINY`` shape (same weights for the same depth)."""
    torch.manual_seed(1234)
    with torch.device(device or "cpu"):
        return Qwen3DenseForCausalLM(
            small_causal_lm_params(num_hidden_layers=num_layers, **TINY),
            PipelineStageInfo(0, 1),
            hidden_states_snapshot_mode="no",
            enable_checkpointing=enable_checkpointing,
        )


def with_compile_config(model: nn.Module, config) -> nn.Module:
    """Applies ``config`` with ``d9d.compile.apply_compile_config``; returns ``model``."""
    from d9d.compile import apply_compile_config

    apply_compile_config(model, config)
    return model


def load_stage_from_full(stage_module: nn.Module, full_module: nn.Module) -> None:
    """Copies the weights of ``stage_module`` from the one-stage model, matched by name."""
    full = full_module.state_dict()
    stage_module.load_state_dict({key: full[key] for key in stage_module.state_dict()})


@torch.no_grad()
def randomize_(module: nn.Module) -> nn.Module:
    """Gives every parameter an O(1)-signal random value, in place.

    Norm weights become U(0.5, 1.5): at their init value of 1 a norm applied at the wrong
    place (e.g. q/k-norm after RoPE) would go unnoticed. Linear weights get std
    ``fan_in ** -0.5`` (HF's 0.02 would make attention almost uniform and hide RoPE,
    masking and scaling bugs); embeddings get N(0, 1).
    """
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            param.uniform_(0.5, 1.5)
        elif "embed" in name:
            param.normal_(0.0, 1.0)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5)
    return module


def reference_model(cls, params, snapshot: str = "no", seed: int = 0) -> nn.Module:
    """The single-process model a layout is compared with (the same on every rank).

    PyTorch's seeded initialisation, then norm weights U(0.5, 1.5): at their init value
    of 1 a norm applied in the wrong place (or on the wrong shard) would go unnoticed.
    """
    torch.manual_seed(seed)
    model = build(cls, params, mode=snapshot)
    model.reset_parameters()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def reference_step(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor, dict]:
    """One forward/backward of the whole global batch, written out by hand.

    The loss is the mean over valid labels (``!= -100``): summed per-token NLL of a
    causal LM, or summed cross entropy of a classifier's scores, over their count.

    Returns:
        The outputs, the detached loss and a copy of every gradient by name.
    """
    import inspect

    import torch.nn.functional as F

    accepted = inspect.signature(model.forward).parameters
    out = model(**{k: v for k, v in batch.items() if k in accepted})
    labels = batch["labels"]
    count = (labels != -100).sum()
    if "logps" in out:
        loss = out["logps"].sum() / count
    else:
        loss = F.cross_entropy(out["scores"], labels, ignore_index=-100, reduction="sum") / count
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out, loss.detach(), grads


# ---------------------------------------------------------------------------------------
# Batches and training steps


def random_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    """Random token ids that include the first and the last id of the vocabulary."""
    ids = torch.randint(0, vocab_size, (batch, seq))
    ids[0, 0] = vocab_size - 1
    ids[-1, -1] = 0
    return ids


def make_batch(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(input_ids, labels)``, already shifted, with one ignored label."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)
    labels = ids[:, 1:].clone()
    labels[0, 0] = -100
    return ids[:, :-1], labels


def train_step(model, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One forward/backward; returns the loss and a copy of every gradient by name."""
    model.zero_grad(set_to_none=True)
    input_ids, labels = make_batch(batch, seq, seed)
    logps = model(input_ids=input_ids, labels=labels)["logps"]
    loss = logps[labels != -100].mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------
# Comparisons and measurements


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_scaled(actual, expected, what: str, tol: float = 1e-5) -> None:
    """Max abs error at most ``tol`` times ``max(1, max |expected|)``."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(1.0, scale), f"{what}: max abs error {err:.3e} (scale {scale:.2f})"


class SavedActivationBytes(TorchDispatchMode):
    """Counts the bytes of tensors created during a forward that are still alive after it.

    These are what autograd (or a checkpoint) keeps for the backward. Storages are tracked
    through weak references, so nothing is kept alive by the measurement itself.
    """

    def __init__(self):
        super().__init__()
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                self._storages[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        """Bytes of tracked storages still alive, skipping the data pointers in ``exclude``."""
        return sum(
            nbytes
            for ptr, (ref, nbytes) in self._storages.items()
            if ref() is not None and ptr not in exclude
        )


# ---------------------------------------------------------------------------------------
# Hugging Face transformers


def hf_config(params: Qwen3DenseParameters, attn_implementation: str = "sdpa", **extra):
    """The HF ``Qwen3Config`` of the same architecture (untied embeddings, no dropout).

    Written by the library's own converter: a field it got wrong would give HF another
    architecture, which the parity tests' outputs would show.
    """
    from transformers import Qwen3Config

    from d9d.module.model.qwen3_dense.hf_config import hf_config_from_params

    fields = hf_config_from_params(Qwen3DenseForCausalLMParameters(model=params))
    return Qwen3Config(**{**fields, **extra}, attn_implementation=attn_implementation)


HF_VOCAB = 96
# Two vocabulary splits in non-alphabetical order: rows of the HF matrices map to splits.
HF_SPLITS = {
    "split_vocab_size": {"text": 70, "special": 26},
    "split_vocab_order": ["text", "special"],
}
HF_PAD = 3


def hf_folder_config(**kwargs):
    """The ``Qwen3Config`` of the small checkpoints the HF load/export tests write."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        # Not HF's default base, so a loader that ignored the config would show up.
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        pad_token_id=HF_PAD,
        **kwargs,
    )


def save_random_hf(model, folder, max_shard_size="50MB"):
    """Randomises an HF model (norms included), saves it to ``folder`` and returns it."""
    torch.manual_seed(1)
    randomize_(model)
    model.eval().save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def hf_tokens() -> torch.Tensor:
    """``(3, 21)`` token ids touching both ends of ``HF_VOCAB``."""
    torch.manual_seed(2)
    ids = torch.randint(0, HF_VOCAB, (3, 21))
    ids[0, 0], ids[1, 1] = HF_VOCAB - 1, 0  # both ends of the vocabulary (both splits)
    return ids


@torch.no_grad()
def hf_nll(hf_model, ids) -> torch.Tensor:
    """HF's per-token NLL of ``ids[:, 1:]`` given ``ids[:, :-1]`` (fp64)."""
    logits = hf_model(ids[:, :-1]).logits.double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, ids[:, 1:, None])[..., 0]


# ---------------------------------------------------------------------------------------
# Spawned gloo ranks

# A hung collective (one rank failed) must fail the test, not stall the suite: every
# collective gives up after this, and the whole job is killed after SPAWN_TIMEOUT_S.
PG_TIMEOUT = datetime.timedelta(seconds=120)
SPAWN_TIMEOUT_S = 600.0


def _worker(rank: int, world_size: int, workdir: str, target: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=PG_TIMEOUT,
    )
    module_name, fn_name = target.rsplit(":", 1)
    fn = getattr(importlib.import_module(module_name), fn_name)
    try:
        result = fn(workdir=workdir, **kwargs)
    except BaseException:
        Path(workdir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_spawned(
    world_size: int, target: str, timeout_s: float = SPAWN_TIMEOUT_S, **kwargs
) -> list[dict]:
    """Runs ``target`` (``"module:function"``) on ``world_size`` spawned gloo ranks.

    The function is called as ``fn(workdir=..., **kwargs)`` on every rank and returns a
    JSON-able dict.

    Returns:
        The per-rank results, in rank order.

    Raises:
        RuntimeError: With the failing ranks' tracebacks if any rank raised, or if the job
            ran past ``timeout_s`` (then every rank is killed).
    """
    with tempfile.TemporaryDirectory(prefix="d9d_dist_") as workdir:
        context = mp.start_processes(
            _worker,
            args=(world_size, workdir, target, kwargs),
            nprocs=world_size,
            start_method="spawn",
            join=False,
        )
        end = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, min(5.0, end - time.monotonic()))):
                if time.monotonic() > end:
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                    raise RuntimeError(
                        f"spawned job {target} on {world_size} ranks ran past {timeout_s:.0f} s "
                        f"(a hang); ranks done: {sorted(Path(workdir).glob('rank*.json'))}"
                    )
        except mp.ProcessRaisedException as err:
            errors = sorted(Path(workdir).glob("rank*.error"))
            details = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in errors)
            raise RuntimeError(f"spawned ranks failed:\n{details or err}") from err
        except mp.ProcessExitedException as err:
            errors = sorted(Path(workdir).glob("rank*.error"))
            details = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in errors)
            raise RuntimeError(f"a spawned rank died ({err}):\n{details}") from err
        return [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world_size)]


def fresh_subdir(workdir: str, name: str) -> str:
    """Returns ``workdir/name``, created (for checkpoints shared by all ranks)."""
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return path


def guarded(fn, *args, **kwargs) -> dict:
    """Runs one scenario of a batched multi-rank job; an exception becomes its result.

    A scenario that raises then fails only its own test (which reads ``"error"``), with
    its own traceback, instead of losing every result of the job.
    """
    try:
        return fn(*args, **kwargs)
    except Exception:
        return {"error": traceback.format_exc()}


def scenario_result(per_rank: list[dict], name: str) -> list[dict]:
    """The per-rank results of scenario ``name``; fails with the scenario's traceback."""
    results = [rank[name] for rank in per_rank]
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "error" in result:
            raise AssertionError(f"scenario {name!r} raised on rank {rank}:\n{result['error']}")
    return results


# ---------------------------------------------------------------------------------------
# Reading back what the metric sinks wrote


def read_wandb_offline_history(run_folder: str | os.PathLike) -> list[dict]:
    """The ``log`` calls of an offline W&B run, as ``{key: value}`` dicts (with ``_step``).

    An offline run's ``run-<id>.wandb`` file is a LevelDB-style log (a 7-byte W&B header,
    then 32 KiB blocks of records with a 7-byte header each: crc, length, type) holding
    ``wandb_internal_pb2.Record`` protobufs; the history records are what ``log`` sent.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_folder).glob("run-*.wandb")
    data = path.read_bytes()
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, else middle / last
        if kind in (1, 4):
            records.append(pending)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return history
