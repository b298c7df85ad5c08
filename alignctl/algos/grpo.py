"""GRPO on the online loop: groups of completions per prompt, group-relative advantages, no value model.

Per step: ``num_generations`` completions for each of ``batch_size`` prompts, scored by the reward
sources; advantages are each completion's reward against its group's (``rl.advantages
.group_advantages``); then ``num_iterations`` passes of the clipped objective with the KL term
(``losses.grpo.grpo_loss``). Old log-probs are computed only when ``num_iterations > 1`` (with one
pass the sampling policy is the current one and the ratio is 1 by construction); reference
log-probs only when ``beta != 0`` (with ``beta=0`` no reference model is even built).
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
from alignctl.losses.grpo import GRPO_LOSS_TYPES, grpo_loss
from alignctl.rl.advantages import GROUP_SCALES, group_advantages


def check_grpo_config(cfg) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"algo.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "num_iterations"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if cfg.num_generations < 2:
        raise bad("num_generations", "must be >= 2 (advantages compare completions of the same prompt)")
    completions = cfg.batch_size * cfg.num_generations
    per_step = cfg.mini_batch_size * cfg.gradient_accumulation_steps
    if completions % per_step:
        raise ConfigError(
            f"algo.batch_size x algo.num_generations = {completions} completions must be a multiple of "
            f"algo.mini_batch_size x algo.gradient_accumulation_steps = {per_step}"
        )
    if cfg.loss_type not in GRPO_LOSS_TYPES:
        raise bad("loss_type", f"use one of {', '.join(GRPO_LOSS_TYPES)}")
    if cfg.scale_rewards not in GROUP_SCALES:
        raise bad("scale_rewards", f"use one of {', '.join(GROUP_SCALES)}")
    if not 0 < cfg.epsilon < 1:
        raise bad("epsilon", "must be in (0, 1)")
    if cfg.epsilon_high is not None and not cfg.epsilon_high > 0:
        raise bad("epsilon_high", "must be > 0 (or null for algo.epsilon)")
    if cfg.beta < 0:
        raise bad("beta", "must be >= 0 (0 uses no reference model)")


class GRPOAlgorithm(PolicyRolloutAlgorithm):
    def __init__(self, job: DictConfig) -> None:
        super().__init__(job)
        check_grpo_config(self.cfg)

    def needs_reference(self, job: DictConfig) -> bool:
        return job.algo.beta != 0

    def iteration(self, batch: Dict[str, Any], loop) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        cfg, accelerator = self.cfg, loop.accelerator
        sampled = self.sample(batch, loop, repeats=cfg.num_generations)
        rollout = sampled.rollout
        start = time.perf_counter()
        # Group statistics over every process's completions (each process holds whole groups).
        all_rewards = accelerator.gather(sampled.total.float())
        advantages, _std, zero_std = group_advantages(all_rewards, cfg.num_generations, cfg.scale_rewards)
        local = slice(accelerator.process_index * len(rollout), (accelerator.process_index + 1) * len(rollout))
        rollout.advantages = advantages[local]
        if cfg.mask_truncated_completions:
            rollout.response_mask = rollout.response_mask * rollout.finished.unsqueeze(1).long()
        if cfg.num_iterations > 1:
            rollout.logprobs = self.policy_logps(loop, rollout, cfg.mini_batch_size)
        if cfg.beta != 0:
            rollout.ref_logprobs = self.reference_logps(loop, rollout, cfg.mini_batch_size)
        logps_s = time.perf_counter() - start

        start = time.perf_counter()
        losses, stats = self._update(loop, rollout)
        update_s = time.perf_counter() - start

        metrics = self.completion_metrics(sampled, prefix="")
        metrics["frac_reward_zero_std"] = zero_std.float().mean().cpu()
        metrics.update({k: torch.stack(v).float().mean().cpu() for k, v in stats.items()})
        metrics.update({
            "time/generate": torch.tensor(sampled.timings["generate"]), "time/score": torch.tensor(sampled.timings["score"]),
            "time/logps": torch.tensor(logps_s), "time/update": torch.tensor(update_s),
        })
        self.show_samples(loop, sampled)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        return loss, metrics, sampled.rollout.response_mask.sum().cpu()

    def _update(self, loop, rollout) -> Tuple[List[torch.Tensor], Dict[str, List[torch.Tensor]]]:
        """num_iterations passes over one shuffled split of the completions into mini-batches."""
        cfg, accelerator = self.cfg, loop.accelerator
        order = torch.randperm(len(rollout))
        parts = [rollout.select(order[i : i + cfg.mini_batch_size]).trimmed() for i in range(0, len(rollout), cfg.mini_batch_size)]
        epsilon_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        losses: List[torch.Tensor] = []
        stats: Dict[str, List[torch.Tensor]] = {}
        for _ in range(cfg.num_iterations):
            for first in range(0, len(parts), cfg.gradient_accumulation_steps):
                group = parts[first : first + cfg.gradient_accumulation_steps]
                # dapo: completion tokens of the whole optimizer step, over every process
                tokens = torch.stack([p.response_mask.sum() for p in group]).sum().float()
                tokens = accelerator.reduce(tokens, reduction="sum") if accelerator.num_processes > 1 else tokens
                per_process = tokens / accelerator.num_processes

                def compute(part, per_process=per_process):
                    out = loop.model(part, with_entropy=True)
                    result = grpo_loss(
                        out["logprobs"], part.logprobs, part.advantages, part.response_mask.float(),
                        loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=epsilon_high, beta=cfg.beta,
                        ref_logprobs=part.ref_logprobs, max_completion_length=self.generation.max_new_tokens,
                        num_items=per_process.clamp(min=1), entropy=out["entropy"],
                    )
                    return result.loss, result.stats

                self.optimize_parts(loop, group, compute, losses, stats)
        return losses, stats


def validate_job(job: DictConfig) -> None:
    check_online_job(job)
    check_grpo_config(job.algo)


def run_grpo(job: DictConfig) -> RunResult:
    validate_job(job)
    return run_online(job, GRPOAlgorithm(job), title=f"grpo ({job.algo.loss_type}, beta={job.algo.beta})")
