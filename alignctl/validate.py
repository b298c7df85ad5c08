"""Checks of a composed job that its types cannot express, run by ``alignctl train`` right after
composition: before an algorithm's own checks, before anything is written or launched.

Ranges and choice fields are tables (key, test, what is needed), applied wherever the key exists
(an ``algo.*`` key only for the algorithms whose schema has it, or those named), so a new field is
one row. Each failure is one ConfigError naming the key's full path, its value and the fix.
Checks that need more than the config (data, model, checkpoints) live where those are read.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from alignctl.errors import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Range:
    key: str
    ok: Callable[[float], bool]
    needs: str  # completes "must be ..."
    optional: bool = False  # null is allowed (and means "off" / "default")
    algos: Optional[Tuple[str, ...]] = None  # only for these algorithms


def at_least(n: float) -> Callable[[float], bool]:
    return lambda v: v >= n


def positive(v: float) -> bool:
    return v > 0


def unit_interval(v: float) -> bool:  # [0, 1)
    return 0 <= v < 1


PREFERENCE = ("dpo", "cpo", "orpo", "kto")

RANGES: Sequence[Range] = (
    Range("train.max_steps", lambda v: v == -1 or v >= 1, "-1 (train for train.num_epochs) or >= 1"),
    Range("train.num_epochs", positive, "> 0"),
    Range("train.per_device_batch_size", at_least(1), ">= 1"),
    Range("train.per_device_eval_batch_size", at_least(1), ">= 1 (or null: the training batch size)", optional=True),
    Range("train.gradient_accumulation_steps", at_least(1), ">= 1"),
    Range("train.lr", positive, "> 0"),
    Range("train.warmup_steps", at_least(0), ">= 0"),
    Range("train.warmup_ratio", unit_interval, "in [0, 1)"),
    Range("train.weight_decay", at_least(0), ">= 0"),
    Range("train.adam_beta1", unit_interval, "in [0, 1)"),
    Range("train.adam_beta2", unit_interval, "in [0, 1)"),
    Range("train.adam_epsilon", positive, "> 0"),
    Range("train.max_grad_norm", at_least(0), ">= 0 (0 disables clipping)"),
    Range("train.logging_steps", at_least(1), ">= 1"),
    Range("train.eval_steps", at_least(0), ">= 0 (0: evaluate only at the end)"),
    Range("train.save_steps", at_least(0), ">= 0 (0: no checkpoints during training)"),
    Range("train.save_total_limit", at_least(1), ">= 1 (or null: keep every checkpoint)", optional=True),
    Range("train.logps_chunk_size", at_least(1), ">= 1"),
    Range("train.length_group_batches", at_least(1), ">= 1"),
    Range("train.max_consecutive_nonfinite", at_least(1), ">= 1"),
    Range("dataset.eval_fraction", unit_interval, "in [0, 1)"),
    Range("dataset.max_rows", at_least(1), ">= 1 (or null: every row)", optional=True),
    Range("algo.max_length", at_least(1), ">= 1"),
    Range("algo.max_prompt_length", at_least(1), ">= 1"),
    Range("algo.beta", positive, "> 0 (a negative beta learns the opposite preference)", algos=PREFERENCE),
    Range("algo.label_smoothing", lambda v: 0 <= v <= 0.5, "in [0, 0.5]", algos=("dpo", "cpo")),
    Range("algo.cpo_alpha", at_least(0), ">= 0", algos=("cpo",)),
    Range("algo.discopop_tau", positive, "> 0", algos=("dpo",)),
    Range("algo.desirable_weight", positive, "> 0", algos=("kto",)),
    Range("algo.undesirable_weight", positive, "> 0", algos=("kto",)),
    Range("algo.neftune_noise_alpha", at_least(0), ">= 0 (or null: off)", optional=True, algos=("sft",)),
    Range("algo.center_rewards_coefficient", at_least(0), ">= 0 (or null: off)", optional=True, algos=("reward",)),
)

# key -> the valid values: a tuple, or "module:NAME" of one (imported only when the key is checked).
CHOICES = {
    "train.lr_scheduler": ("constant", "linear", "cosine"),
    "precision.name": ("fp32", "bf16", "fp16"),
    "peft.method": ("none", "lora", "qlora"),
    "launcher.name": "alignctl.launch:LAUNCHERS",
    "algo.truncation_mode": ("keep_start", "keep_end"),
}
# algo.loss_type, per algorithm.
LOSS_TYPES = {
    "dpo": "alignctl.losses.dpo:DPO_LOSS_TYPES",
    "cpo": "alignctl.losses.cpo:CPO_LOSS_TYPES",
    "kto": "alignctl.losses.kto:KTO_LOSS_TYPES",
}


def validate_job(job: DictConfig) -> None:
    """Every config-only check, in order: interpolations, ranges, choices, relations."""
    check_interpolations(job)
    for rule in RANGES:
        _check_range(job, rule)
    for key, valid in CHOICES.items():
        _check_choice(job, key, valid)
    if job.algo.name in LOSS_TYPES:
        _check_choice(job, "algo.loss_type", LOSS_TYPES[job.algo.name])
    _check_prompt_fits(job)


def _check_range(job: DictConfig, rule: Range) -> None:
    if rule.algos is not None and job.algo.name not in rule.algos:
        return
    value = OmegaConf.select(job, rule.key, default=_ABSENT)
    if value is _ABSENT or (value is None and rule.optional):
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{rule.key}={value}: must be a number {rule.needs}")
    if not math.isfinite(value) or not rule.ok(value):
        raise ConfigError(f"{rule.key}={value}: must be {rule.needs}")


def _check_choice(job: DictConfig, key: str, valid: Any) -> None:
    value = OmegaConf.select(job, key, default=_ABSENT)
    if value is _ABSENT:
        return
    if isinstance(valid, str):
        module, _, name = valid.partition(":")
        valid = getattr(importlib.import_module(module), name)
    if value not in valid:
        raise ConfigError(f"{key}={value!r}: use one of {', '.join(valid)}")


def _check_prompt_fits(job: DictConfig) -> None:
    """Pairwise data cuts the prompt to max_prompt_length first: the answers need room after it."""
    from alignctl.algo_configs import PairwiseDataConfig
    from alignctl.registry import get_algorithm

    algo = job.algo
    if not issubclass(get_algorithm(algo.name).config_cls, PairwiseDataConfig):
        return
    if algo.max_prompt_length >= algo.max_length:
        raise ConfigError(
            f"algo.max_prompt_length={algo.max_prompt_length} must be < algo.max_length={algo.max_length} (the "
            "answers need room after the prompt); lower algo.max_prompt_length or raise algo.max_length"
        )


# ---------------------------------------------------------------------------------- interpolations
def check_interpolations(job: DictConfig) -> None:
    """Resolve every ``${...}`` once, so one that cannot be resolved (an unset environment variable,
    a value of the wrong type) is one line naming its key, not a traceback later."""
    for key, node in _interpolated(job, ""):
        try:
            value = OmegaConf.select(job, key, throw_on_resolution_failure=True)
            if isinstance(value, (DictConfig, ListConfig)):
                OmegaConf.to_container(value, resolve=True)
        except Exception as exc:  # OmegaConf raises several types; all mean "cannot resolve"
            raise ConfigError(_interpolation_message(key, node._value(), exc)) from None


def _interpolated(cfg: Any, prefix: str):
    """(full key, node) of every interpolation in ``cfg``."""
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        node = cfg._get_node(key)
        path = f"{prefix}.{key}" if prefix else str(key)
        if node._is_interpolation():
            yield path, node
        elif isinstance(node, (DictConfig, ListConfig)) and not node._is_missing() and not node._is_none():
            yield from _interpolated(node, path)


def _interpolation_message(key: str, raw: Any, exc: BaseException) -> str:
    variable = re.search(r"oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)", str(raw))
    if variable and "not found" in str(exc):
        return (
            f"{key}={raw}: environment variable {variable.group(1)} is not set; export it, or set {key} "
            "directly"
        )
    reason = " ".join(str(exc).split("\n")[0].split()).replace("KeyError raised while resolving interpolation: ", "")
    return f"{key}={raw}: cannot be resolved ({reason}); fix the interpolation or set {key} directly"
