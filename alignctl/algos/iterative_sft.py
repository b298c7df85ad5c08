"""Iterative SFT (expert iteration / rejection sampling) on the online loop.

Each step is a round: ``num_generations`` completions for each of ``batch_size`` prompts, scored by
the reward sources; the best completion of each prompt (``selection=best``) or every completion
scoring at least ``score_threshold`` (``selection=threshold``) is kept, and the policy is
fine-tuned on the kept ones with the SFT loss on completion tokens (mean negative log-likelihood at
temperature 1), ``sft_epochs`` passes. Rounds are checkpointed like any step (``train.save_steps``,
1 by default for this algorithm).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import torch
from omegaconf import DictConfig

from alignctl.algos.online_base import PolicyRolloutAlgorithm, check_online_job
from alignctl.engine.online import run_online
from alignctl.engine.run import RunResult
from alignctl.errors import ConfigError

SELECTIONS = ("best", "threshold")


def check_iterative_sft_config(cfg) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"algo.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("batch_size", "num_generations", "mini_batch_size", "gradient_accumulation_steps", "sft_epochs"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if cfg.selection not in SELECTIONS:
        raise bad("selection", f"use one of {', '.join(SELECTIONS)}")
    if cfg.selection == "threshold" and cfg.score_threshold is None:
        raise ConfigError("algo.selection=threshold needs algo.score_threshold=<lowest score kept>")
    if cfg.selection == "best" and cfg.score_threshold is not None:
        raise ConfigError("algo.score_threshold is used only with algo.selection=threshold; set both or neither")


def select_kept(scores: torch.Tensor, group_size: int, selection: str, threshold) -> torch.Tensor:
    """Indices of the kept completions: the best of each contiguous group, or all >= threshold.
    NaN scores (a reward function said "not applicable") are never kept."""
    finite = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if selection == "best":
        grouped = finite.view(-1, group_size)
        best = grouped.argmax(dim=1) + torch.arange(grouped.shape[0], device=scores.device) * group_size
        return best[finite[best] > float("-inf")]
    return (finite >= threshold).nonzero().flatten()


class IterativeSFTAlgorithm(PolicyRolloutAlgorithm):
    def __init__(self, job: DictConfig) -> None:
        super().__init__(job)
        check_iterative_sft_config(self.cfg)

    def needs_reference(self, job: DictConfig) -> bool:
        return False

    def iteration(self, batch: Dict[str, Any], loop) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        sampled = self.sample(batch, loop, repeats=cfg.num_generations)
        kept_index = select_kept(sampled.total, cfg.num_generations, cfg.selection, cfg.score_threshold)
        start = time.perf_counter()
        losses: List[torch.Tensor] = []
        if len(kept_index):
            kept = sampled.rollout.select(kept_index)

            def compute(part):
                logps = loop.model(part, temperature=1.0)["logprobs"]
                mask = part.response_mask.float()
                return -(logps * mask).sum() / mask.sum().clamp(min=1), {}

            for _ in range(cfg.sft_epochs):
                parts = (part.trimmed() for part in kept.minibatches(cfg.mini_batch_size))
                self.optimize_parts(loop, parts, compute, losses, {})
        elif loop.accelerator.is_main_process:
            loop.tracker.print(f"[yellow]round {loop.progress.step + 1}: no completion was kept; no update[/]")
        metrics = self.completion_metrics(sampled, prefix="round/")
        kept_scores = sampled.total[kept_index].float()
        metrics.update({
            "round/kept": torch.tensor(float(len(kept_index))),
            "round/kept_score_mean": kept_scores.mean().cpu() if len(kept_index) else torch.tensor(float("nan")),
            "time/generate": torch.tensor(sampled.timings["generate"]), "time/score": torch.tensor(sampled.timings["score"]),
            "time/update": torch.tensor(time.perf_counter() - start),
        })
        self.show_samples(loop, sampled)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        return loss, metrics, sampled.rollout.response_mask.sum().cpu()


def validate_job(job: DictConfig) -> None:
    check_online_job(job)
    check_iterative_sft_config(job.algo)


def run_iterative_sft(job: DictConfig) -> RunResult:
    validate_job(job)
    return run_online(job, IterativeSFTAlgorithm(job), title=f"iterative sft ({job.algo.selection})")
