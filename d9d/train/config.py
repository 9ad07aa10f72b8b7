"""The training configuration: one validated TOML file plus ``--set key=value`` overrides.

Every section rejects unknown keys; :func:`load_train_config` names the file and the dotted
key of every error. With no file at all, the defaults describe the built-in run: a small
byte-level model trained on the CPU on the Python standard library's own sources.
"""

import inspect
import re
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from d9d.core.config_errors import read_toml, validation_problems
from d9d.core.dist_context import DeviceMeshParameters
from d9d.module.model.qwen3_dense.hf_config import causal_lm_params_from_hf_config
from d9d.module.model.qwen3_dense.params import Qwen3DenseForCausalLMParameters
from d9d.module.model.qwen3_dense.presets import SHAPE_FIELDS, get_model_preset, preset_parameters


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """``[model]``: which Qwen3 Dense shape to train and where its weights start.

    Attributes:
        preset: A name of ``d9d.module.model.qwen3_dense.presets`` (ignored with ``init`` an HF
            folder: the folder's ``config.json`` decides the shape).
        init: ``"scratch"`` (the model's own initialisation) or the path of an HF Qwen3
            checkpoint folder to start from.
        vocab_size: Overrides the preset's vocabulary; ``None`` keeps the preset's, except
            with the byte-level tokenizer, where the vocabulary becomes the tokenizer's
            rounded up to a multiple of 64.
        num_hidden_layers: Overrides the preset's depth.
        hidden_size: Overrides the preset's width.
        intermediate_size: Overrides the preset's MLP width.
        num_attention_heads: Overrides the preset's query heads.
        num_key_value_heads: Overrides the preset's key/value heads.
        head_dim: Overrides the preset's head size.
    """

    preset: str = "tiny"
    init: str = "scratch"
    vocab_size: int | None = Field(default=None, ge=1)
    num_hidden_layers: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_attention_heads: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    head_dim: int | None = Field(default=None, ge=1)

    def parameters(
        self, seq_len: int, tokenizer_vocab: int, byte_tokenizer: bool
    ) -> Qwen3DenseForCausalLMParameters:
        """The model's parameters: the HF folder's, or the preset with these overrides.

        Args:
            seq_len: The training sequence length (the positions must cover it).
            tokenizer_vocab: The tokenizer's vocabulary size.
            byte_tokenizer: Whether the byte-level tokenizer is used (then an unset
                ``vocab_size`` becomes the tokenizer's, rounded up to a multiple of 64).

        Raises:
            ValueError: If the folder has no config, the shape is rejected, the
                tokenizer's vocabulary does not fit the model's, or the sequence is
                longer than the model's positions.
        """
        if self.init != "scratch":
            if not Path(self.init, "config.json").is_file():
                raise ValueError(
                    f"model.init: no HF checkpoint folder (config.json) at {self.init}"
                )
            params = causal_lm_params_from_hf_config(self.init)
        else:
            overrides = {
                field: getattr(self, field)
                for field in SHAPE_FIELDS
                if field in type(self).model_fields
            }
            if self.vocab_size is None and byte_tokenizer:
                # Byte-level: no point in the preset's 32k rows; a multiple of 64 keeps the
                # head's matmul aligned.
                overrides["vocab_size"] = -(-tokenizer_vocab // 64) * 64
            preset = get_model_preset(self.preset)
            overrides["max_position_ids"] = max(preset.max_position_ids, seq_len)
            params = preset_parameters(self.preset, **overrides)
        vocab = params.model.vocab_size
        if tokenizer_vocab > vocab:
            raise ValueError(
                f"the tokenizer's vocabulary ({tokenizer_vocab} ids) is larger than the "
                f"model's ({vocab}): set model.vocab_size >= {tokenizer_vocab} or use another "
                "tokenizer"
            )
        if seq_len > params.model.max_position_ids:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds the model's max_position_ids="
                f"{params.model.max_position_ids}"
            )
        return params


class DataSection(_Section):
    """``[data]``: documents, tokenizer, packing and batch shape.

    Attributes:
        source: ``"stdlib"`` (the Python standard library's ``.py`` files and pydoc
            topics, present on every machine with Python), ``"tokens"`` (token files,
            ``.npy`` or raw ``.bin``) or ``"text"`` (``.txt``, ``.jsonl`` or ``.parquet``
            files, tokenized once and cached as token files).
        paths: Files (or folders, searched recursively for the source's suffixes).
        tokenizer: ``"byte"`` (256 bytes plus specials) or the path of an HF
            ``tokenizer.json`` (or of the folder holding it).
        eos_id: The id separating documents in token files (``None``: the tokenizer's).
        token_dtype: Dtype of raw ``.bin`` token files.
        text_key: The JSONL field / Parquet column holding the text.
        cache_dir: Where tokenized text is cached (``None``: ``<output_dir>/token_cache``).
        seq_len: Tokens per packed row fed to the model.
        global_batch_size: Rows per optimizer step, over all data-parallel ranks.
        max_documents: Use at most this many documents (``None``: all).
    """

    source: Literal["stdlib", "tokens", "text"] = "stdlib"
    paths: tuple[str, ...] = ()
    tokenizer: str = "byte"
    eos_id: int | None = Field(default=None, ge=0)
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    text_key: str = "text"
    cache_dir: str | None = None
    seq_len: int = Field(default=128, ge=1)
    global_batch_size: int = Field(default=16, ge=1)
    max_documents: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _paths_for_files(self) -> "DataSection":
        if self.source != "stdlib" and not self.paths:
            raise ValueError(f"source {self.source!r} needs 'paths'")
        return self


class OptimizerSection(_Section):
    """``[optimizer]``: AdamW.

    Attributes:
        lr: Peak learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: Decoupled weight decay.
    """

    lr: float = Field(default=3e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        # AdamW's own check would only fire at the first step, without the key.
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class LrSection(_Section):
    """``[lr]``: the learning-rate schedule (see ``d9d.train.lr``).

    Attributes:
        schedule: Shape after warmup: ``"cosine"``, ``"linear"``, ``"wsd"``
            (warmup-stable-decay) or ``"constant"``.
        warmup_steps: Linear warmup from ``lr / warmup_steps`` to ``lr``.
        min_lr_ratio: The final learning rate as a fraction of the peak.
        decay_steps: ``"wsd"`` only: length of the final decay (``None``: 20% of the run).
    """

    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(default=20, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    decay_steps: int | None = Field(default=None, ge=1)


class ParallelSection(_Section):
    """``[parallel]``: the layout (the product must equal the world size).

    Attributes:
        pipeline_parallel: Pipeline ranks.
        data_parallel_shard: FSDP ranks.
        data_parallel_replicate: HSDP replicas.
        tensor_parallel: Tensor-parallel ranks (sequence parallel between blocks; they
            read the same data).
        context_parallel: Context-parallel ranks that also shard the weights (FSDP over
            ``data_parallel_shard x context_parallel``): they read the same rows and each
            trains on a head-tail share of every row's tokens.
        context_parallel_replicate: Context-parallel ranks that replicate the weights.
        pipeline_schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``.
        stages_per_rank: Pipeline stages per rank (more than 1 needs interleaved 1F1B).
        n_microbatches: Microbatches per step (``None``: the number of pipeline stages;
            1 without pipelining).
    """

    pipeline_parallel: int = Field(default=1, ge=1)
    data_parallel_shard: int = Field(default=1, ge=1)
    data_parallel_replicate: int = Field(default=1, ge=1)
    tensor_parallel: int = Field(default=1, ge=1)
    context_parallel: int = Field(default=1, ge=1)
    context_parallel_replicate: int = Field(default=1, ge=1)
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    stages_per_rank: int = Field(default=1, ge=1)
    n_microbatches: int | None = Field(default=None, ge=1)

    def mesh_parameters(self) -> DeviceMeshParameters:
        """The device mesh of this layout (the one description of the parallel degrees)."""
        return DeviceMeshParameters(
            pipeline_parallel=self.pipeline_parallel,
            data_parallel_shard=self.data_parallel_shard,
            data_parallel_replicate=self.data_parallel_replicate,
            tensor_parallel=self.tensor_parallel,
            context_parallel_shard=self.context_parallel,
            context_parallel_replicate=self.context_parallel_replicate,
        )

    @property
    def world_size(self) -> int:
        """Processes this layout needs."""
        return self.mesh_parameters().world_size


class ClipSection(_Section):
    """``[clip]``: gradient clipping and non-finite gradients.

    Attributes:
        max_norm: Clip the global L2 norm to this (``None``: measure only).
        max_consecutive_nonfinite: Stop after this many non-finite norms in a row (each
            skips its optimizer step).
    """

    max_norm: float | None = Field(default=1.0, gt=0)
    max_consecutive_nonfinite: int = Field(default=3, ge=1)


class CheckpointSection(_Section):
    """``[checkpoint]``: saving, keeping and resuming.

    Attributes:
        folder: Where checkpoints go (``None``: ``<output_dir>/checkpoints``).
        interval: Save every this many steps (0: only at the end).
        keep_last: Keep this many complete checkpoints of the live branch (older ones of
            that branch are deleted, except the newest one whose step had a finite
            gradient norm).
        save_final: Save after the last step.
        resume: Resume from the newest complete checkpoint of the branch that ran last,
            if there is one. ``false`` with checkpoints in ``folder`` is refused (unless
            ``overwrite``).
        resume_from: Resume from this checkpoint folder instead; an older checkpoint than
            its branch's newest starts a new branch (the newer ones stay untouched).
        overwrite: With ``resume = false``: move the folder's checkpoints aside (into
            ``<folder>/replaced-<time>/``) instead of refusing to start.
        allow_changes: On resume, apply changed ``steps``, ``optimizer.*``, ``lr.*`` and
            ``clip.*`` settings (the LR schedule is rebuilt for them from the resumed
            step) instead of refusing to resume.
        async_save: Stage checkpoints in CPU memory and write them in the background
            while training goes on (DCP ``async_save``; one extra copy of the rank's
            model and optimizer state in host memory while a save is in flight).
        export_hf: At the end, write an HF folder to ``<output_dir>/hf`` (needs the
            ``safetensors`` package, checked before the first step).
        kill_after_save: Testing aid: SIGKILL this process right after the checkpoint of
            this step is complete (simulates a crash).
        kill_during_save: Testing aid: send ``kill_signal`` to this process while the
            checkpoint of this step is being written (its files written, its manifest
            not yet; with ``async_save`` once the next step has run).
        kill_signal: Testing aid: the signal ``kill_during_save`` sends.
    """

    folder: str | None = None
    interval: int = Field(default=0, ge=0)
    keep_last: int = Field(default=2, ge=1)
    save_final: bool = True
    resume: bool = True
    resume_from: str | None = None
    overwrite: bool = False
    allow_changes: bool = False
    async_save: bool = False
    export_hf: bool = True
    kill_after_save: int | None = Field(default=None, ge=1)
    kill_during_save: int | None = Field(default=None, ge=1)
    kill_signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL"


class EvalSection(_Section):
    """``[eval]``: the held-out loss (see ``d9d.train.validation``).

    Evaluation is on when ``enabled`` is true, or unset with ``fraction`` or ``paths``
    given; it then runs every ``interval`` steps and always after the last step.

    Attributes:
        enabled: ``None``: on exactly when ``fraction`` or ``paths`` is set. ``False``
            with ``fraction`` set keeps the held-out documents out of training and runs
            no evaluation, so switching evaluation off leaves the training data as is.
        fraction: Share of the corpus's documents held out (a seeded split of the
            document indices, the same under every layout; no document on both sides).
        paths: Held-out files instead, read like ``[data]`` (token files for
            ``source = "tokens"``, text files otherwise, with the same tokenizer).
        interval: Evaluate every this many steps (0: only after the last step).
        max_batches: Global batches per evaluation (``None``: the whole held-out set).
    """

    enabled: bool | None = None
    fraction: float | None = Field(default=None, gt=0, lt=1)
    paths: tuple[str, ...] = ()
    interval: int = Field(default=0, ge=0)
    max_batches: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "EvalSection":
        if self.fraction is not None and self.paths:
            raise ValueError("set 'fraction' or 'paths', not both")
        if self.enabled and self.fraction is None and not self.paths:
            raise ValueError("enabled = true needs 'fraction' or 'paths' (the held-out data)")
        settings = sorted(self.model_fields_set & {"interval", "max_batches"})
        if self.enabled is None and self.fraction is None and not self.paths and settings:
            # Likely meant to evaluate: say so instead of silently not evaluating.
            raise ValueError(
                f"{' and '.join(map(repr, settings))} set, but no 'fraction' or 'paths' "
                "(the held-out data)"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether evaluations run."""
        if self.enabled is not None:
            return self.enabled
        return self.fraction is not None or bool(self.paths)


class MetricsSection(_Section):
    """``[metrics]``: where step and eval metrics go (see ``d9d.train.metric_sinks``).

    Rank 0 writes every sink.

    Attributes:
        jsonl: ``<output_dir>/metrics.jsonl``, one JSON line per logged step and per
            evaluation (``--plot`` reads it).
        tensorboard: TensorBoard event files under ``<output_dir>/tensorboard`` (needs
            the ``tensorboard`` package: ``pip install 'd9d[tensorboard]'``).
        wandb: A Weights & Biases run under ``<output_dir>/wandb``, offline unless the
            ``WANDB_MODE`` environment variable says otherwise (``pip install
            'd9d[wandb]'``).
    """

    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False


class TrainConfig(_Section):
    """A whole training run.

    Attributes:
        steps: Optimizer steps.
        seed: Seeds the model initialisation, the data order and every RNG.
        output_dir: Metrics (``metrics.jsonl``), checkpoints, plots and exports.
        compile_preset: A preset of ``compile_configs/`` (or a TOML path).
        compile_optimizer: Compile the AdamW step (one fused kernel, the learning rate a
            tensor: no recompile when the schedule moves it). ``None``: the preset's
            ``[compile] optimizer`` (on with every compile preset, off with ``eager``).
        mixed_precision: ``"auto"``: ``"bf16"`` where the device multiplies bf16 faster
            (GPUs, CPUs with bf16 matmul units; measured on a CPU), else ``"fp32"``; the
            choice is printed. ``"bf16"``: fp32 parameters and optimizer state, bf16 compute,
            fp32 gradient reduction; ``"fp32"``: everything fp32; ``"pure_bf16"``: bf16
            parameters, optimizer state and gradients (cheaper, less accurate).
        log_interval: Print and record every this many steps.
        num_threads: CPU threads per process (``None``: torch's default).
        reuse_host_memory: On the CPU, keep freed host memory in the process for reuse
            (glibc ``mallopt``: no ``mmap`` per large tensor), so that each step's large
            tensors cost no page faults; ``false`` keeps the C library's defaults.
        peak_tflops: Peak TFLOP/s per device for MFU (``None``: the datasheet value of a
            known accelerator, or a measured GEMM peak on the CPU).
        model: See :class:`ModelSection`.
        data: See :class:`DataSection`.
        optimizer: See :class:`OptimizerSection`.
        lr: See :class:`LrSection`.
        parallel: See :class:`ParallelSection`.
        clip: See :class:`ClipSection`.
        checkpoint: See :class:`CheckpointSection`.
        eval: See :class:`EvalSection`.
        metrics: See :class:`MetricsSection`.
    """

    steps: int = Field(default=300, ge=1)
    seed: int = 0
    output_dir: str = "runs/default"
    compile_preset: str = "eager"
    compile_optimizer: bool | None = None
    mixed_precision: Literal["auto", "bf16", "fp32", "pure_bf16"] = "auto"
    log_interval: int = Field(default=1, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    reuse_host_memory: bool = True
    peak_tflops: float | None = Field(default=None, gt=0)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr: LrSection = Field(default_factory=LrSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    clip: ClipSection = Field(default_factory=ClipSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)

    @property
    def checkpoint_folder(self) -> Path:
        """The checkpoint folder (``checkpoint.folder`` or ``<output_dir>/checkpoints``)."""
        return Path(self.checkpoint.folder or Path(self.output_dir) / "checkpoints")


def _parse_value(text: str) -> Any:
    # A TOML value when it parses as one (numbers, booleans, arrays, quoted strings),
    # otherwise the bare text as a string: `--set data.tokenizer=byte` needs no quotes.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Applies overrides (dotted keys) to a raw config dict.

    Args:
        data: The raw TOML dict (not modified).
        overrides: ``--set`` items like ``"steps=10"``, ``"parallel.pipeline_parallel=2"``,
            ``"data.paths=['a.npy']"`` (values in TOML syntax, bare strings allowed), or a
            mapping of dotted keys to Python values (``{"data.seq_len": 64}``).

    Returns:
        A new dict with the overrides applied.

    Raises:
        ValueError: For an item without ``=`` or a key that descends into a non-table.
    """
    result = _deep_copy(data)
    if isinstance(overrides, Mapping):
        pairs = [(key, value, f"{key}={value!r}") for key, value in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set {item!r}: expected key=value")
            pairs.append((key.strip(), _parse_value(text.strip()), item))
    for key, value, item in pairs:
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return result


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_train_config(
    path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Reads, overrides and validates a training config.

    Args:
        path: A TOML file, or ``None`` for the built-in defaults.
        overrides: ``key=value`` items, or a mapping of dotted keys to values, applied on
            top (see :func:`apply_overrides`).

    Returns:
        The validated config.

    Raises:
        ValueError: If the file is missing or not valid TOML, or a key is unknown or has a
            bad value (the message names the file, or ``--set``, and the dotted key).
    """
    source = "<defaults>"
    data: dict = {}
    if path is not None:
        source = str(path)
        data = read_toml(Path(path), "training config")
    if overrides:
        shown = (
            [f"{k}={v!r}" for k, v in overrides.items()]
            if isinstance(overrides, Mapping)
            else list(overrides)
        )
        source = f"{source} with --set {' '.join(shown)}"
        data = apply_overrides(data, overrides)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: invalid training config: {validation_problems(err)}") from err


def _attribute_docs(cls: type[BaseModel]) -> dict[str, str]:
    # The first sentence of each entry under "Attributes:" in the class docstring.
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    entries: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2)
        elif name is not None and line.startswith("        "):
            entries[name] += " " + line.strip()
        elif line.strip():
            name = None
    return {key: text.replace("``", "") for key, text in entries.items()}


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_reference() -> str:
    """Every config key with its default and its description, from the models.

    Generated from :class:`TrainConfig` and its sections (their fields and docstrings),
    so it cannot drift from what :func:`load_train_config` accepts.
    """
    lines = []
    defaults = TrainConfig()

    def section(cls: type[BaseModel], value: BaseModel, prefix: str) -> None:
        docs = _attribute_docs(cls)
        nested = []
        for name in cls.model_fields:
            current = getattr(value, name)
            if isinstance(current, BaseModel):
                nested.append((name, type(current), current))
                continue
            lines.append(f"  {prefix}{name} = {_toml_value(current)}")
            lines.extend(
                textwrap.wrap(
                    docs.get(name, ""), 96, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
            )
        for name, sub_cls, sub_value in nested:
            lines.append(f"  [{prefix}{name}]")
            section(sub_cls, sub_value, f"{prefix}{name}.")

    section(TrainConfig, defaults, "")
    return "\n".join(lines)
