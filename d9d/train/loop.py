"""The training loop: the pieces of ``d9d.train`` put together for ``python -m d9d.train``.

``Trainer(config)`` validates everything it can before the first step (files, vocabulary,
batch shape, layout, checkpoint), builds this rank's pipeline stages with the training
stack's builder, and resumes from the latest complete checkpoint. ``Trainer.run()`` then
steps: data -> forward/backward (``d9d.pipelining.step.build_schedule``: a pipeline
schedule or the single stage, one loss normalisation) -> clipping by the global norm ->
AdamW (skipped on a non-finite norm) -> LR schedule -> one log line and one JSON line in
``<output_dir>/metrics.jsonl`` (and the other ``[metrics]`` sinks) -> the held-out loss
when due (``d9d.train.validation``) -> checkpoint (its save time goes to
``<output_dir>/checkpoints.jsonl``). Folders and free space are checked before the first
step (``preflight``), the start or resume follows ``resume`` (lineage, verification,
resume policy), and a stop for non-finite norms, a failed save or SIGTERM is a
``RunStopped`` (``stop``).
"""

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.checkpoint.hf_export import export_hf_from_checkpoint
from d9d.checkpoint.training import CheckpointError, CheckpointManager
from d9d.compile import load_compile_config
from d9d.compile.optimizer import CompiledAdamW
from d9d.core.checks import inputs_prevalidated
from d9d.core.dist_context import DistributedContext
from d9d.core.host_memory import reuse_freed_host_memory
from d9d.dataset.corpus import DocumentCorpus
from d9d.dataset.heldout import HeldOutBatches
from d9d.dataset.packed_batches import PackedBatches
from d9d.dataset.text_files import tokenize_stdlib, tokenize_text_files
from d9d.dataset.token_files import open_token_file, token_files_in
from d9d.dataset.tokenizers import load_tokenizer
from d9d.metrics.flops import training_flops_per_token
from d9d.metrics.memory import process_peak_memory
from d9d.metrics.peak import resolve_peak_flops
from d9d.module.parallelism.context_parallel import (
    check_context_parallel_seq_len,
    shard_batch_for_context_parallel,
)
from d9d.pipelining.loss import CausalLMLoss
from d9d.pipelining.step import build_schedule
from d9d.stack import build_stage_modules
from d9d.train.config import TrainConfig
from d9d.train.grad_norm import clip_grad_norm_
from d9d.train.lr import build_lr_scheduler
from d9d.train.metric_sinks import METRICS_FILE, check_metric_sinks, open_metric_sinks
from d9d.train.mixed_precision import apply_mixed_precision, resolve_auto_mode
from d9d.train.preflight import check_free_space, prepare_folders
from d9d.train.progress import Progress, format_duration
from d9d.train.resume import start_or_resume
from d9d.train.stop import RunStopped, SigtermGuard, Terminated
from d9d.train.validation import EvalMetrics, Validator, eval_source, split_eval_corpus

CHECKPOINTS_FILE = "checkpoints.jsonl"


@dataclass
class StepMetrics:
    """What one step reports (one log line, one JSON line).

    Attributes:
        step: Optimizer steps done, this one included.
        loss: Global mean loss of the step.
        grad_norm: Global gradient norm before clipping.
        lr: Learning rate the step used.
        tokens_per_second: Global tokens (all slots) per second.
        mfu: Model FLOPs utilisation per device (fraction).
        memory_bytes: Peak memory (accelerator allocator, or peak RSS on the CPU).
        step_seconds: Wall time of the step.
        overhead_seconds: Time of the loop's own work (data, clipping, logging).
        skipped: The optimizer step was skipped (non-finite norm).
    """

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_second: float
    mfu: float
    memory_bytes: int
    step_seconds: float
    overhead_seconds: float
    skipped: bool = False

    def line(self, total_steps: int, memory_label: str, eta: str = "") -> str:
        """The human-readable log line (``eta``: the time left, shown when given)."""
        skipped = " | SKIPPED (non-finite grad norm)" if self.skipped else ""
        eta = f" | ETA {eta}" if eta else ""
        return (
            f"step {self.step:>{len(str(total_steps))}}/{total_steps} | loss {self.loss:.4f} | "
            f"grad_norm {self.grad_norm:.3f} | lr {self.lr:.2e} | "
            f"{self.tokens_per_second:,.0f} tok/s | MFU {100 * self.mfu:.1f}% | "
            f"{memory_label} {self.memory_bytes / 2**30:.2f} GiB{eta}{skipped}"
        )


def build_dist_context(config: TrainConfig) -> DistributedContext:
    """The distributed context of the config's layout (a world of one without torchrun).

    Outside ``torchrun`` the context is a world of one, so that FSDP2 mixed precision and
    DCP run exactly as they do under ``torchrun``.

    Raises:
        ValueError: If the layout's process count is not the world size.
    """
    mesh = config.parallel.mesh_parameters()
    # Each CP rank trains on a head-tail share of every row: the rows must split (checked
    # before the process groups are built, on every rank alike).
    check_context_parallel_seq_len(
        config.data.seq_len,
        mesh.context_parallel_shard * mesh.context_parallel_replicate,
        "data.seq_len",
    )
    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if mesh.world_size != world:
        raise ValueError(
            f"[parallel] describes {mesh.world_size} processes ({mesh.describe()}), but "
            f"{world} were started; run it with torchrun --nproc-per-node "
            f"{mesh.world_size} -m d9d.train ..."
        )
    return mesh.build()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(message: str) -> None:
    # The step and evaluation lines are the run's results: stdout, so that they can be
    # piped or kept apart from the status lines and errors on stderr.
    print(message, flush=True)


class Trainer:
    """One rank's share of a training run, ready to step."""

    def __init__(self, config: TrainConfig, *, log=_log, report=None):
        """Validates the config against the data and model, builds everything, resumes.

        Args:
            config: The run.
            log: Receives status lines (rank 0 only); stderr by default.
            report: Receives the step and evaluation lines (rank 0 only); stdout by
                default, or ``log`` when only ``log`` is given.

        Raises:
            ValueError: For bad input found before the first step (missing files, a
                corpus smaller than one batch, a vocabulary larger than the model's, an
                incompatible checkpoint, a layout that does not fit).
        """
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.ctx = build_dist_context(config)
        self.is_main = self.ctx.rank == 0
        if self.ctx.device.type == "cpu" and config.reuse_host_memory:
            # Before anything large is allocated: each step's big tensors then reuse
            # pages already mapped (no page faults every step).
            reuse_freed_host_memory()
        self._log = log if self.is_main else (lambda _m: None)
        if report is None:
            report = _report if log is _log else log
        self._report = report if self.is_main else (lambda _m: None)
        if config.checkpoint.export_hf:
            try:
                import safetensors  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    "checkpoint.export_hf needs the 'safetensors' package (pip install "
                    "'d9d[hf]'), or set checkpoint.export_hf=false"
                ) from err
        check_metric_sinks(config.metrics)
        self.output_dir = Path(config.output_dir)
        prepare_folders(config)
        torch.manual_seed(config.seed)

        tokenizer = load_tokenizer(config.data.tokenizer)
        self.tokenizer = tokenizer
        corpus, heldout = split_eval_corpus(
            config.eval,
            self._corpus(tokenizer),
            lambda paths: self._corpus(tokenizer, paths),
            config.seed,
        )
        self.params = config.model.parameters(
            config.data.seq_len, tokenizer.vocab_size, config.data.tokenizer == "byte"
        )
        corpus = corpus.split_long_documents(self.params.model.max_position_ids)
        vocab = self.params.model.vocab_size
        top = corpus.max_token_id()
        if top >= vocab:
            raise ValueError(
                f"the data holds token id {top}, outside the model's vocabulary of {vocab}"
            )
        parallel = config.parallel
        self.n_microbatches = parallel.n_microbatches or (
            parallel.pipeline_parallel * parallel.stages_per_rank
        )
        local_batch = config.data.global_batch_size // max(1, self.ctx.dp_size)
        if local_batch * self.ctx.dp_size != config.data.global_batch_size:
            raise ValueError(
                f"data.global_batch_size={config.data.global_batch_size} does not split over "
                f"{self.ctx.dp_size} data-parallel ranks"
            )
        if local_batch % self.n_microbatches:
            raise ValueError(
                f"the per-rank batch of {local_batch} rows does not split into "
                f"{self.n_microbatches} microbatches (parallel.n_microbatches)"
            )
        self.data = PackedBatches(
            corpus,
            config.data.seq_len,
            config.data.global_batch_size,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            seed=config.seed,
            pad_id=tokenizer.pad_id,
        )
        self._log(
            f"data: {len(corpus)} documents, {corpus.num_tokens:,} tokens -> "
            f"{len(self.data.plan)} rows of {config.data.seq_len + 1} "
            f"({self.data.batches_per_epoch} batches per epoch)"
        )
        self.heldout = self._heldout_batches(heldout) if config.eval.active else None

        mode, why = self._mixed_precision_mode()
        self._log(f"precision: {why}")
        compile_config, param_dtype = apply_mixed_precision(
            load_compile_config(config.compile_preset), mode
        )
        self.compile_config = compile_config
        init = "reset" if config.model.init == "scratch" else config.model.init
        self.stages = build_stage_modules(
            self.params,
            compile_config,
            self.ctx,
            num_stages_per_rank=parallel.stages_per_rank,
            param_dtype=param_dtype,
            init=init,
            seed=config.seed,
        )
        self.modules = list(self.stages.modules)
        opt = config.optimizer
        hyper = dict(lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        compiled = compile_config.compile.compiles_optimizer
        if config.compile_optimizer is not None:
            compiled = config.compile_optimizer
        # One optimizer (and scheduler) per stage module: the checkpoint then maps each
        # module's flattened optimizer state by its parameters' names.
        self.optimizers = [
            CompiledAdamW(module.parameters(), backend=compile_config.compile.backend, **hyper)
            if compiled
            else torch.optim.AdamW(module.parameters(), **hyper)
            for module in self.modules
        ]
        lr = config.lr
        self.schedulers = [
            build_lr_scheduler(
                optimizer,
                lr.schedule,
                config.steps,
                warmup_steps=min(lr.warmup_steps, config.steps),
                min_lr_ratio=lr.min_lr_ratio,
                decay_steps=lr.decay_steps,
            )
            for optimizer in self.optimizers
        ]
        # Under context parallelism each rank's rows hold its share of the tokens.
        local_seq = config.data.seq_len // self.ctx.cp_size
        example = {
            key: torch.zeros(local_batch, local_seq, dtype=torch.int64)
            for key in ("input_ids", "labels", "position_ids")
        }
        # One step object for every layout: a pipeline schedule or the single stage.
        self.schedule = build_schedule(
            self.ctx,
            self.modules,
            list(self.stages.infos),
            example,
            self.n_microbatches,
            CausalLMLoss(),
            kind=parallel.pipeline_schedule,
        )
        self.validator = None
        if self.heldout is not None:
            self.validator = Validator(
                self.heldout,
                self.schedule,
                self.modules,
                self.ctx.device,
                config.eval,
                config.steps,
                prepare_batch=self._prepare_batch,
            )
        ck = config.checkpoint
        self.checkpoints = CheckpointManager(
            config.checkpoint_folder, keep_last=ck.keep_last, async_save=ck.async_save
        )
        self.checkpoints.before_commit = self._testing_kill
        self.checkpoints.on_complete = self._saved
        self.step = 0
        self._last_finite = True
        self._logged_step = 0
        self._sigterm = SigtermGuard()
        self._param_dtype = param_dtype
        self._resume()

        flops = training_flops_per_token(self.params, config.data.seq_len).total
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self._flops_per_step_per_device = flops * self.tokens_per_step / self.ctx.world_size
        float8 = compile_config.float8.enabled
        self.peak = resolve_peak_flops(
            self.ctx.device,
            self.stages.compute_dtype,
            float8=float8,
            override_tflops=config.peak_tflops,
        )
        self._memory_label = process_peak_memory(self.ctx.device)[1]
        self._log(f"MFU against {self.peak.source}")
        self._nonfinite_in_a_row = 0
        self._sinks = []
        self.eval_history: list[EvalMetrics] = []

    # -----------------------------------------------------------------------------------

    def _mixed_precision_mode(self) -> tuple[str, str]:
        mode = self.config.mixed_precision
        if mode != "auto":
            return mode, f"{mode} (mixed_precision in the config)"
        # Rank 0 measures; every rank must train in the same precision.
        choice = list(resolve_auto_mode(self.ctx.device)) if self.is_main else [None, None]
        dist.broadcast_object_list(choice, src=0)
        return choice[0], f"{choice[1]} (mixed_precision = 'auto')"

    def _corpus(self, tokenizer, paths: tuple[str, ...] | None = None) -> DocumentCorpus:
        # ``paths``: held-out files, read like [data]'s (all their documents).
        data = self.config.data
        cache = data.cache_dir or str(self.output_dir / "token_cache")
        max_documents = data.max_documents if paths is None else None
        if data.source == "tokens":
            files = token_files_in(paths or data.paths)
            return DocumentCorpus(
                [open_token_file(p, data.eos_id, data.token_dtype) for p in files],
                max_documents,
            )
        # Rank 0 tokenizes (with progress lines); the others wait and read its cache.
        path = None
        if self.is_main:
            if data.source == "stdlib" and paths is None:
                path = tokenize_stdlib(tokenizer, cache, progress=self._log)
            else:
                path = tokenize_text_files(
                    paths or data.paths,
                    tokenizer,
                    cache,
                    text_key=data.text_key,
                    progress=self._log,
                )
        shared = [str(path) if path else None]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is None:
            raise ValueError("tokenizing the corpus failed on rank 0")
        return DocumentCorpus([open_token_file(shared[0], None)], max_documents)

    def _heldout_batches(self, heldout: DocumentCorpus) -> HeldOutBatches:
        config = self.config
        source = eval_source(config.eval)
        heldout = heldout.split_long_documents(self.params.model.max_position_ids)
        if config.eval.paths and len(heldout):
            top = heldout.max_token_id()
            if top >= self.params.model.vocab_size:
                raise ValueError(
                    f"eval.paths: the held-out data holds token id {top}, outside the "
                    f"model's vocabulary of {self.params.model.vocab_size}"
                )
        batches = HeldOutBatches(
            heldout,
            config.data.seq_len,
            config.data.global_batch_size,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            seed=config.seed,
            pad_id=self.tokenizer.pad_id,
            max_batches=config.eval.max_batches,
            source=source,
        )
        self._log(
            f"eval: {len(heldout)} held-out documents, {heldout.num_tokens:,} tokens -> "
            f"{len(batches.plan)} rows ({batches.num_batches} of {batches.total_batches} "
            "batches per evaluation)"
        )
        return batches

    def _model_signature(self) -> dict:
        return self.params.model_dump(mode="json")

    def _resume(self) -> None:
        self.step = start_or_resume(
            self.config,
            self.checkpoints,
            modules=self.modules,
            optimizers=self.optimizers,
            schedulers=self.schedulers,
            data=self.data,
            model_params=self._model_signature(),
            metrics_path=self.output_dir / METRICS_FILE,
            log=self._log,
            check=self._check_free_space,
        )

    def _check_free_space(self, step: int, own_checkpoints: int) -> None:
        self.checkpoints.estimate_bytes = check_free_space(
            self.config, self.params, self._param_dtype, step=step, own_checkpoints=own_checkpoints
        )

    # -----------------------------------------------------------------------------------

    def _prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One way from a loader's batch to the step object's, for training and evaluation.
        batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
        # The ranks of a CP group read the same rows; each keeps its share of the tokens.
        return shard_batch_for_context_parallel(batch, self.ctx.cp_rank, self.ctx.cp_size)

    def train_step(self) -> StepMetrics:
        """Runs one optimizer step; returns its metrics."""
        started = time.perf_counter()
        batch = self._prepare_batch(self.data.next_batch())
        data_seconds = time.perf_counter() - started
        lr = self.optimizers[0].param_groups[0]["lr"]
        # Every token id and position was checked against the model before the first
        # step: the stages skip their per-microbatch value checks (host syncs).
        with inputs_prevalidated():
            loss = self.schedule.step(batch).loss
        clip_started = time.perf_counter()
        norm = clip_grad_norm_(
            self.stages.parameters(), self.config.clip.max_norm, pp_group=self.ctx.pp_group
        )
        finite = bool(torch.isfinite(norm))
        self._last_finite = finite
        clip_seconds = time.perf_counter() - clip_started
        if finite:
            self._nonfinite_in_a_row = 0
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            self._nonfinite_in_a_row += 1
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        loss_value = loss.item()  # waits for the step on accelerators
        seconds = time.perf_counter() - started
        return StepMetrics(
            step=self.step,
            loss=loss_value,
            grad_norm=norm.item(),
            lr=lr,
            tokens_per_second=self.tokens_per_step / seconds,
            mfu=self._flops_per_step_per_device / seconds / self.peak.flops_per_second,
            memory_bytes=process_peak_memory(self.ctx.device)[0],
            step_seconds=seconds,
            overhead_seconds=data_seconds + clip_seconds,
            skipped=not finite,
        )

    def _record(self, metrics: StepMetrics, eta_seconds: float | None = None) -> None:
        log_started = time.perf_counter()
        if self.is_main:
            eta = format_duration(eta_seconds) if eta_seconds is not None else ""
            self._report(metrics.line(self.config.steps, self._memory_label, eta))
            for sink in self._sinks:
                sink.write(asdict(metrics))
        metrics.overhead_seconds += time.perf_counter() - log_started

    def _evaluate(self) -> EvalMetrics:
        # Every rank evaluates its share; rank 0 reports.
        result = self.validator.run(self.step)
        if self.is_main:
            self._report(result.line(self.config.steps))
            for sink in self._sinks:
                sink.write(asdict(result))
        return result

    def save_checkpoint(self) -> Path:
        """Saves a checkpoint of the current step (every rank calls this).

        With ``checkpoint.async_save`` it returns once the state is staged in CPU memory;
        the checkpoint is complete (and logged) when the background write finishes.
        """
        config = self.config
        with self._sigterm.deferred():
            return self.checkpoints.save(
                self.step,
                self.modules,
                self.optimizers,
                scheduler=self.schedulers[0],
                data_state=self.data.state_dict(),
                model_params=self._model_signature(),
                extra={
                    "layout": config.parallel.model_dump(),
                    "config": config.model_dump(mode="json"),
                },
                last_step_finite=self._last_finite,
            )

    def _saved(self, step: int, path: Path, seconds: float, blocking: float) -> None:
        # Rank 0, when a save is complete (from the background thread for async saves).
        how = ""
        if self.config.checkpoint.async_save:
            how = f" ({blocking:.2f} s of it blocking training)"
        self._log(f"saved {path} in {seconds:.2f} s{how}")
        with (self.output_dir / CHECKPOINTS_FILE).open("a") as f:
            record = {"step": step, "path": str(path), "seconds": seconds}
            record["blocking_seconds"] = blocking
            f.write(json.dumps(record) + "\n")

    def _testing_kill(self, step: int) -> None:
        # checkpoint.kill_during_save: a crash after a save's files, before its manifest.
        ck = self.config.checkpoint
        if ck.kill_during_save != step:
            return
        if ck.async_save:
            # Show that training went on meanwhile: wait until the next step is logged.
            deadline = time.monotonic() + 120
            while self._logged_step <= step and time.monotonic() < deadline:
                time.sleep(0.01)
        os.kill(os.getpid(), getattr(signal, ck.kill_signal))
        if ck.kill_signal == "SIGTERM":
            self._log(f"testing aid: sent SIGTERM while step-{step} was being written")

    def _last_good(self) -> str:
        good = [
            f.path
            for f in self.checkpoints.found()
            if f.manifest is not None
            and f.manifest.get("last_step_finite", True)
            and self.checkpoints.lineage.on_history(self.checkpoints.branch, f.branch, f.step)
        ]
        if not good:
            return "no checkpoint of a step with a finite norm was saved"
        return f"the last good checkpoint (finite gradient norm) is {good[-1]}"

    def run(self) -> list[StepMetrics]:
        """Trains until ``config.steps``; returns the metrics of the steps run here.

        A background save still in flight is completed before it returns (or raises).

        Raises:
            RunStopped: After ``clip.max_consecutive_nonfinite`` non-finite gradient
                norms in a row (naming the last good checkpoint), when a save fails, or on
                SIGTERM (exit code 143, after completing a background save).
        """
        try:
            with self._sigterm.installed():
                return self._run()
        except Terminated:
            # Complete the save in flight (or let it clean up after itself), then stop.
            outcome = ""
            if self.checkpoints.pending:
                try:
                    outcome = f"; completed the background save {self.checkpoints.wait()}"
                except CheckpointError as err:
                    outcome = f"; abandoned the background save ({err})"
            latest = self.checkpoints.latest()
            raise RunStopped(
                f"stopped by SIGTERM after step {self.step}{outcome}; the newest complete "
                f"checkpoint is {latest}",
                143,
            ) from None
        finally:
            try:
                self.checkpoints.close()
            except CheckpointError as err:
                self._log(f"error: {err}")

    def _run(self) -> list[StepMetrics]:
        config = self.config
        history = []
        self.eval_history = []
        for module in self.modules:
            module.train()
        progress = Progress(config.steps)
        self._sinks = (
            open_metric_sinks(
                config.metrics,
                self.output_dir,
                resumed_step=self.step,
                config=config.model_dump(mode="json"),
                log=self._log,
            )
            if self.is_main
            else []
        )
        try:
            self._train_until_done(history, progress)
        finally:
            for sink in self._sinks:
                sink.close()
            self._sinks = []
        return history

    def _train_until_done(self, history: list[StepMetrics], progress: Progress) -> None:
        config = self.config
        while self.step < config.steps:
            metrics = self.train_step()
            eta_seconds = progress.eta_seconds(metrics.step, metrics.step_seconds)
            if metrics.skipped:
                self._log(
                    f"step {metrics.step}: non-finite gradient norm {metrics.grad_norm}; "
                    f"optimizer step skipped ({self._nonfinite_in_a_row} in a row)"
                )
                if self._nonfinite_in_a_row >= config.clip.max_consecutive_nonfinite:
                    self._record(metrics)
                    try:
                        self.checkpoints.wait()
                    except CheckpointError as err:
                        self._log(f"error: {err}")
                    raise RunStopped(
                        f"stopping at step {metrics.step}: {self._nonfinite_in_a_row} "
                        "non-finite gradient norms in a row (clip.max_consecutive_nonfinite); "
                        f"{self._last_good()}"
                    )
            if metrics.step % config.log_interval == 0 or metrics.step == config.steps:
                self._record(metrics, eta_seconds)
            history.append(metrics)
            if self.validator is not None and self.validator.due(self.step):
                self.eval_history.append(self._evaluate())
            self._logged_step = self.step
            ck = config.checkpoint
            last = self.step == config.steps
            if (ck.interval and self.step % ck.interval == 0) or (last and ck.save_final):
                try:
                    self.save_checkpoint()
                except CheckpointError as err:
                    raise RunStopped(str(err)) from err
                if ck.kill_after_save == self.step:
                    # Testing aid: die like a crash would, right after a complete save.
                    self.checkpoints.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
        try:
            self.checkpoints.wait()
        except CheckpointError as err:
            raise RunStopped(str(err)) from err

    def export_hf(self, folder: str | os.PathLike | None = None) -> Path:
        """Writes the trained model as an HF folder (every rank calls this).

        Rank 0 streams it from the checkpoint of the current step (saved first if there
        is none), one tensor at a time; the other ranks wait.

        Returns:
            The folder written (``<output_dir>/hf`` by default).
        """
        folder = Path(folder or self.output_dir / "hf")
        self.checkpoints.wait()
        path = self.checkpoints.checkpoint_of(self.step)
        if path is None:
            self.save_checkpoint()
            path = self.checkpoints.wait() or self.checkpoints.checkpoint_of(self.step)
        export_hf_from_checkpoint(self.params, path, folder)
        self._log(f"exported an HF folder to {folder}")
        return folder
