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

from alignctl.engine.heap import check_trim_heap
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
    Range("train.memory_budget_gb", positive, "> 0 (or null: no budget, checkpoint always)", optional=True),
    Range("train.length_group_batches", at_least(1), ">= 1"),
    Range("train.max_consecutive_nonfinite", at_least(1), ">= 1"),
    Range("dataset.eval_fraction", unit_interval, "in [0, 1) (or null: auto, 5% of data sets of >= 2,000 rows)", optional=True),
    Range("dataset.max_rows", at_least(1), ">= 1 (or null: every row)", optional=True),
    Range("dataset.max_eval_rows", at_least(1), ">= 1 (or null: every row)", optional=True),
    Range("algo.max_length", at_least(1), ">= 1"),
    Range("algo.max_prompt_length", at_least(1), ">= 1"),
    Range("algo.beta", positive, "> 0 (a negative beta learns the opposite preference)", algos=PREFERENCE),
    Range("algo.label_smoothing", lambda v: 0 <= v <= 0.5, "in [0, 0.5]", algos=("dpo", "cpo")),
    Range("algo.cpo_alpha", at_least(0), ">= 0", algos=("cpo",)),
    Range("algo.discopop_tau", positive, "> 0", algos=("dpo",)),
    Range("algo.f_alpha_divergence_coef", math.isfinite, "a finite number", algos=("dpo",)),
    Range("algo.ld_alpha", lambda v: 0 <= v <= 1, "in [0, 1] (or null: off)", optional=True, algos=("dpo",)),
    Range("algo.rpo_alpha", at_least(0), ">= 0 (or null: off)", optional=True, algos=("dpo",)),
    Range("algo.ref_model_mixup_alpha", lambda v: 0 < v <= 1, "in (0, 1]", algos=("dpo",)),
    Range("algo.ref_model_sync_steps", at_least(1), ">= 1", algos=("dpo",)),
    Range("algo.router_aux_loss_coef", at_least(0), ">= 0 (or null: the model's own)", optional=True,
          algos=("dpo", "cpo", "orpo")),
    Range("algo.alpha", math.isfinite, "a finite number (0: off)", algos=("cpo",)),
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
    "algo.truncation": ("answers", "joined"),
    "algo.f_divergence_type": "alignctl.losses.dpo:F_DIVERGENCES",
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
    if job.algo.name == "dpo":
        _check_dpo_losses(job.algo)
    elif job.algo.name in LOSS_TYPES:
        _check_choice(job, "algo.loss_type", LOSS_TYPES[job.algo.name])
    _check_prompt_fits(job)
    _check_dpo_reference_sync(job)
    if job.algo.name == "kto":
        for key, default in (("add_bos_to_prompt", True), ("truncation", "answers")):
            if OmegaConf.select(job, f"algo.{key}", default=default) != default:
                raise ConfigError(f"algo.{key} is not supported by kto yet; leave it at {default}")
    _check_run_outputs(job)
    _check_offline_memory_settings(job)


def _check_dpo_losses(algo: DictConfig) -> None:
    """algo.loss_type (a name or a list), loss_weights, rpo_alpha, f_divergence_type, use_weighting."""
    from alignctl.losses.dpo import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, UNWEIGHTABLE_LOSS_TYPES

    raw = algo.loss_type
    types = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, ListConfig) else None
    if not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"algo.loss_type={raw}: give a loss name or a non-empty list of names, e.g. [sigmoid,sft]")
    for name in types:
        if name not in DPO_LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={name!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ConfigError(f"algo.loss_type={list(types)}: a loss type appears twice; give each once with its weight")
    weights = algo.loss_weights
    if weights is not None:
        if len(weights) != len(types):
            raise ConfigError(
                f"algo.loss_weights={list(weights)}: {len(weights)} weights for {len(types)} loss types "
                f"({', '.join(types)}); give one weight per loss type"
            )
        for w in weights:
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"algo.loss_weights={list(weights)}: every weight must be a finite number >= 0")
    if algo.rpo_alpha is not None and "sft" in types:
        raise ConfigError(
            "algo.rpo_alpha adds an sft part, and algo.loss_type already has sft; drop one (set the sft weight "
            "in algo.loss_weights instead of algo.rpo_alpha)"
        )
    if algo.f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ConfigError(
                f"algo.f_divergence_type={algo.f_divergence_type} works with {', '.join(F_DIVERGENCE_LOSS_TYPES)}, "
                f"not {', '.join(bad)}; use f_divergence_type=reverse_kl with those"
            )
    if algo.use_weighting:
        bad = [t for t in types if t in UNWEIGHTABLE_LOSS_TYPES]
        if bad:
            raise ConfigError(
                f"algo.use_weighting=true does not apply to {', '.join(bad)} (their losses are not one per pair); "
                "set algo.use_weighting=false or pick another loss type"
            )


def _check_dpo_reference_sync(job: DictConfig) -> None:
    """TR-DPO mixes the policy into a held reference copy: nothing else can be synced."""
    algo = job.algo
    if algo.name != "dpo" or not algo.sync_ref_model:
        return
    for clash, why in (
        (algo.reference_free, "algo.reference_free=true (there is no reference)"),
        (algo.precompute_ref_logps, "algo.precompute_ref_logps=true (its log-probs would go stale)"),
        (job.peft.method != "none", f"peft={job.peft.method} (the reference is the adapter switched off)"),
        (job.launcher.name in ("fsdp", "deepspeed"), f"launcher={job.launcher.name} (the policy's weights are sharded)"),
    ):
        if clash:
            raise ConfigError(f"algo.sync_ref_model=true cannot be used with {why}; set algo.sync_ref_model=false")


def _check_offline_memory_settings(job: DictConfig) -> None:
    """train.memory_budget_gb and train.trim_heap act in the offline loop only; a budget decides
    train.gradient_checkpointing=null only."""
    from alignctl.registry import get_algorithm

    train = job.train
    if get_algorithm(job.algo.name).loop != "offline":
        for key in ("memory_budget_gb", "trim_heap"):
            if train[key] is not None:
                raise ConfigError(f"train.{key}={train[key]} applies to the offline algorithms only, not "
                                  f"algo={job.algo.name}; drop it")
    elif train.memory_budget_gb is not None and train.gradient_checkpointing is not None:
        raise ConfigError(f"train.memory_budget_gb={train.memory_budget_gb} decides "
                          f"train.gradient_checkpointing only when that is null, but it is "
                          f"{str(train.gradient_checkpointing).lower()}; drop one of the two")
    check_trim_heap(train.trim_heap)


def _check_run_outputs(job: DictConfig) -> None:
    """run.report_to (known trackers, packages installed) and run.sample_prompts."""
    from alignctl.engine.samples import check_sample_prompts
    from alignctl.trackers import check_report_to

    check_report_to(job)
    check_sample_prompts(job)


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
