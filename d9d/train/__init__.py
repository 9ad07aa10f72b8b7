"""The training loop's pieces, each usable alone, and ``python -m d9d.train``.

* ``d9d.train.config``: the validated TOML config (``load_train_config``);
* ``d9d.train.lr``: warmup + cosine / linear / warmup-stable-decay schedules;
* ``d9d.train.grad_norm``: gradient clipping over FSDP shards and pipeline ranks;
* ``d9d.checkpoint.training``: atomic, verified, resumable training checkpoints;
* ``d9d.train.preflight``: folders and free space checked before the first step;
* ``d9d.train.resume`` / ``resume_policy``: how a run starts or resumes, and what a resume
  may change; ``d9d.train.metrics_file``: ``metrics.jsonl`` across restarts and branches;
* ``d9d.train.stop``: one-line stops (non-finite norms, failed saves, SIGTERM);
* ``d9d.train.validation``: the held-out loss (``[eval]``) through the step object's
  forward-only path;
* ``d9d.train.metric_sinks``: ``metrics.jsonl``, TensorBoard and W&B (``[metrics]``);
* ``d9d.train.progress``: the step line's ETA;
* ``d9d.train.plot``: loss, LR and throughput curves of a run (``--plot``);
* ``d9d.train.loop``: the loop that puts them together (its data comes from
  ``d9d.dataset``: tokenizers, token files, cached text, packed resumable batches, the
  held-out split).
"""
