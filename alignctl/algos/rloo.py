"""RLOO on the online loop, as the reference library's RLOOTrainer.

Per step: ``rloo_k`` samples for each of ``batch_size`` prompts; the KL penalty (k1, summed over
the sequence, coefficient ``kl_coef``) is folded into each sample's score, and each sample's
baseline is the mean of the other k-1 samples of its prompt (``rl.advantages.rloo_advantages``).
The update is sequence-level REINFORCE with a clipped importance ratio
(``losses.grpo.rloo_loss``), ``num_ppo_epochs`` passes over shuffled mini-batches. Putting the KL
at the token level instead gives the same summed reward, so one form is implemented.
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
from alignctl.losses.grpo import rloo_loss
from alignctl.rl.advantages import normalize_scores, rloo_advantages


def check_rloo_config(cfg) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"algo.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "num_ppo_epochs"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if cfg.rloo_k < 2:
        raise bad("rloo_k", "must be >= 2 (each sample's baseline is the mean of the others)")
    samples, per_step = cfg.batch_size * cfg.rloo_k, cfg.mini_batch_size * cfg.gradient_accumulation_steps
    if samples % per_step:
        raise ConfigError(
            f"algo.batch_size x algo.rloo_k = {samples} samples must be a multiple of algo.mini_batch_size x "
            f"algo.gradient_accumulation_steps = {per_step}"
        )
    if not cfg.cliprange > 0:
        raise bad("cliprange", "must be > 0")
    if cfg.kl_coef < 0:
        raise bad("kl_coef", "must be >= 0 (0 uses no reference model)")
    if not cfg.reward_clip_range > 0:
        raise bad("reward_clip_range", "must be > 0")


class RLOOAlgorithm(PolicyRolloutAlgorithm):
    def __init__(self, job: DictConfig) -> None:
        super().__init__(job)
        check_rloo_config(self.cfg)

    def needs_reference(self, job: DictConfig) -> bool:
        return job.algo.kl_coef != 0

    def iteration(self, batch: Dict[str, Any], loop) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        sampled = self.sample(batch, loop, repeats=cfg.rloo_k)
        rollout = sampled.rollout
        start = time.perf_counter()
        mask = rollout.response_mask.float()
        scores = sampled.total.float()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~rollout.finished).float()
        if cfg.normalize_reward:
            scores = normalize_scores(scores, cfg.reward_clip_range)
        rollout.logprobs = self.policy_logps(loop, rollout, cfg.mini_batch_size)
        if cfg.kl_coef != 0:
            rollout.ref_logprobs = self.reference_logps(loop, rollout, cfg.mini_batch_size)
            kl_sum = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)
        else:
            kl_sum = torch.zeros_like(scores)
        rollout.advantages, rlhf_reward = rloo_advantages(scores, kl_sum, cfg.rloo_k, cfg.kl_coef, cfg.normalize_advantage)
        logps_s = time.perf_counter() - start

        start = time.perf_counter()
        losses, stats = self._update(loop, rollout)
        update_s = time.perf_counter() - start

        metrics = self.completion_metrics(sampled, prefix="env/")
        metrics.update({
            "objective/kl": kl_sum.mean(), "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": (-cfg.kl_coef * kl_sum).mean(), "objective/rlhf_reward": rlhf_reward.mean(),
            "objective/scores": scores.mean(),
            "time/generate": torch.tensor(sampled.timings["generate"]), "time/score": torch.tensor(sampled.timings["score"]),
            "time/logps": torch.tensor(logps_s), "time/update": torch.tensor(update_s),
        })
        metrics.update({k: torch.stack(v).float().mean() for k, v in stats.items()})
        metrics = {k: v.detach().float().cpu() for k, v in metrics.items()}
        self.show_samples(loop, sampled)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        return loss, metrics, rollout.response_mask.sum().cpu()

    def _update(self, loop, rollout) -> Tuple[List[torch.Tensor], Dict[str, List[torch.Tensor]]]:
        cfg = self.cfg

        def compute(part):
            out = loop.model(part)
            result = rloo_loss(out["logprobs"], part.logprobs, part.advantages, part.response_mask.float(),
                               cliprange=cfg.cliprange)
            return result.loss, result.stats

        losses: List[torch.Tensor] = []
        stats: Dict[str, List[torch.Tensor]] = {}
        for _ in range(cfg.num_ppo_epochs):
            parts = (part.trimmed() for part in rollout.minibatches(cfg.mini_batch_size))
            self.optimize_parts(loop, parts, compute, losses, stats)
        return losses, stats


def validate_job(job: DictConfig) -> None:
    check_online_job(job)
    check_rloo_config(job.algo)


def run_rloo(job: DictConfig) -> RunResult:
    validate_job(job)
    return run_online(job, RLOOAlgorithm(job), title=f"rloo (k={job.algo.rloo_k})")
