"""What a resume may change: refused differences, and settings applied only on request.

A checkpoint records the config of the run that wrote it. On resume the two configs are
compared key by key:

* the data and its order (``seed``, ``data.source``, ``data.tokenizer``, ``data.seq_len``,
  ``data.global_batch_size``, ``data.max_documents``, ``data.eos_id``,
  ``data.token_dtype``, ``data.text_key``) never change: the data cursor would point
  into other rows (the model's shape is compared separately, from its parameters);
* the training schedule (``steps``, ``optimizer.*``, ``lr.*``, ``clip.*``) changes only
  with ``checkpoint.allow_changes = true``; without it the resume is refused with every
  changed key and both values (Megatron-LM's default too). With it, the new values are
  applied and logged: AdamW's hyperparameters are set from the config, and the LR
  schedule is rebuilt for the new settings and fast-forwarded to the resumed step, as
  Megatron-LM's ``--override-opt_param-scheduler`` does;
* everything else (layout, compile preset, precision, threads, logging, checkpointing,
  folders) may differ freely.
"""

from dataclasses import dataclass
from typing import Any

import torch

from d9d.train.config import TrainConfig

FIXED_KEYS = (
    "seed",
    "data.source",
    "data.tokenizer",
    "data.seq_len",
    "data.global_batch_size",
    "data.max_documents",
    "data.eos_id",
    "data.token_dtype",
    "data.text_key",
)
CHANGEABLE_PREFIXES = ("steps", "optimizer.", "lr.", "clip.")
_OPTIMIZER_KEYS = ("betas", "eps", "weight_decay")


@dataclass(frozen=True)
class SettingChange:
    """One key that differs between the checkpoint's config and this run's.

    Attributes:
        key: Dotted key (``"optimizer.lr"``).
        old: The checkpoint's value.
        new: This run's value.
    """

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalise(value: Any) -> Any:
    # JSON turns tuples into lists; compare them as equal.
    return list(value) if isinstance(value, tuple) else value


def compare_configs(saved: dict, current: dict) -> tuple[list[SettingChange], list[SettingChange]]:
    """The differences of two configs (``model_dump(mode="json")`` forms).

    Returns:
        ``(fixed, changeable)``: differences in keys that may never change, and in keys
        that change only with ``checkpoint.allow_changes``.
    """
    old, new = _flatten(saved), _flatten(current)
    fixed, changeable = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = _normalise(old.get(key)), _normalise(new.get(key))
        if a == b:
            continue
        if key in FIXED_KEYS:
            fixed.append(SettingChange(key, a, b))
        elif key.startswith(CHANGEABLE_PREFIXES):
            changeable.append(SettingChange(key, a, b))
    return fixed, changeable


def check_resume(
    saved_config: dict | None, config: TrainConfig, *, path: str, step: int
) -> list[SettingChange]:
    """Refuses a resume that would silently change the run; returns the allowed changes.

    Args:
        saved_config: The config recorded in the checkpoint (``None``: not recorded).
        config: This run's config.
        path: The checkpoint (for the messages).
        step: The checkpoint's step.

    Returns:
        The schedule/optimizer changes to apply (only with ``checkpoint.allow_changes``).

    Raises:
        ValueError: Listing the keys with the checkpoint's and this run's values.
    """
    if saved_config is None:
        return []
    fixed, changeable = compare_configs(saved_config, config.model_dump(mode="json"))
    if fixed:
        raise ValueError(
            f"checkpoint {path} was trained on other data or in another order: "
            + "; ".join(map(str, fixed))
            + " (checkpoint -> now); these cannot change on resume: restore them, or start "
            "a new run in another output_dir"
        )
    if changeable and not config.checkpoint.allow_changes:
        raise ValueError(
            f"resuming {path} would change the run's settings: "
            + "; ".join(map(str, changeable))
            + " (checkpoint -> now); set checkpoint.allow_changes=true to apply them (the LR "
            f"schedule is then rebuilt for them from step {step}), or drop these changes"
        )
    if config.steps < step:
        raise ValueError(
            f"steps={config.steps} is before the step of checkpoint {path} ({step}); "
            "resume from an earlier checkpoint (checkpoint.resume_from) or raise steps"
        )
    return changeable


def apply_changes(
    changes: list[SettingChange],
    config: TrainConfig,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LambdaLR],
    step: int,
) -> str:
    """Applies the config's optimizer and schedule settings to a resumed run.

    The schedulers must have been built from ``config`` (not loaded from the
    checkpoint); they are fast-forwarded to ``step``, so that step ``step + 1`` runs at
    the learning rate a fresh run of these settings would use there.

    Args:
        changes: What :func:`check_resume` returned (for the log line).
        config: This run's config.
        optimizers: The loaded optimizers (their saved hyperparameters are replaced).
        schedulers: One freshly built scheduler per optimizer.
        step: The resumed step.

    Returns:
        The log line saying what was applied.
    """
    opt = config.optimizer
    for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
        # The peak comes from the config, whatever the optimizer held before.
        scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["initial_lr"] = base
            for key in _OPTIMIZER_KEYS:
                group[key] = getattr(opt, key)
        scheduler.last_epoch = step
        pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        lrs = [base * fn(step) for base, fn in pairs]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return (
        "applied changed settings (checkpoint.allow_changes): "
        + "; ".join(map(str, changes))
        + f"; LR schedule rebuilt for {config.steps} steps ({config.lr.schedule}) from step "
        f"{step}: next lr {schedulers[0].get_last_lr()[0]:.3e}"
    )
