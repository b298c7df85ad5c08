"""PPO on the online loop: sample responses, score them, and run PPO updates on the rollout.

``PPOUpdate`` is the algorithm on tensors (a rollout with scores in, stats out), shared by the
online loop and the Python API (``alignctl.api.PPOTrainer.step``). The math is in
``losses/ppo.py`` (clipped policy and value losses) and ``rl/`` (KL penalties, the adaptive
controller, per-token rewards, GAE, score scaling); this module only orders the phases:

1. old log-probs and values of the sampled tokens (one no-grad forward of the policy), reference
   log-probs (one no-grad forward of the reference, or the policy with its adapter off): once per
   rollout, never per epoch;
2. scores -> (missing-EOS penalty, scaling, clipping) -> per-token rewards with the KL penalty ->
   GAE advantages and returns;
3. ``ppo_epochs`` passes of shuffled mini-batches, ``gradient_accumulation_steps`` per optimizer
   step, with early stopping on the policy KL and the ratio threshold;
4. the KL controller update.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from alignctl.algos.online_base import PolicyRolloutAlgorithm, check_online_job
from alignctl.engine.guards import loss_is_finite
from alignctl.engine.online import run_online
from alignctl.engine.run import RunResult
from alignctl.errors import ConfigError
from alignctl.losses.dpo import RunningMoments
from alignctl.losses.ppo import masked_mean, ppo_loss
from alignctl.rl.advantages import gae_advantages, per_token_rewards, scale_scores
from alignctl.rl.kl import KL_PENALTIES, build_kl_controller
from alignctl.rollout.batch import Rollout


def check_ppo_config(cfg) -> None:
    """Ranges and relations of the algo group that the schema's types cannot express."""

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"algo.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    backward = cfg.mini_batch_size * cfg.gradient_accumulation_steps
    if cfg.batch_size % backward:
        raise ConfigError(
            f"algo.batch_size={cfg.batch_size} must be a multiple of algo.mini_batch_size x "
            f"algo.gradient_accumulation_steps = {backward}"
        )
    if cfg.kl_penalty not in KL_PENALTIES:
        raise bad("kl_penalty", f"use one of {', '.join(KL_PENALTIES)}")
    for name in ("target", "horizon", "cliprange", "cliprange_value", "target_kl", "ratio_threshold"):
        if not getattr(cfg, name) > 0:
            raise bad(name, "must be > 0")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise bad(name, "must be in [0, 1]")
    if cfg.init_kl_coef < 0 or cfg.vf_coef < 0:
        raise ConfigError("algo.init_kl_coef and algo.vf_coef must be >= 0")
    if cfg.score_clip is not None and not cfg.score_clip > 0:
        raise bad("score_clip", "must be > 0 (or null for no clipping)")
    if cfg.use_score_norm and not cfg.use_score_scaling:
        raise ConfigError(
            "algo.use_score_norm=true has an effect only with algo.use_score_scaling=true (as in the reference "
            "library); set both"
        )


class PPOUpdate:
    """One PPO step on a rollout. ``model`` is the prepared ``PolicyWithValue``."""

    def __init__(self, cfg, accelerator, model, optimizer, reference, *, temperature: float, chunk_size: int,
                 max_grad_norm: float, on_nonfinite: Optional[Callable[[torch.Tensor, List[int]], None]] = None) -> None:
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.reference = reference
        self.temperature, self.chunk_size, self.max_grad_norm = temperature, chunk_size, max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.kl_ctl = build_kl_controller(cfg.adap_kl_ctrl, cfg.init_kl_coef, cfg.target, cfg.horizon)
        self.running = RunningMoments()  # score statistics (use_score_scaling)

    # ------------------------------------------------------------------ phase 1: old/ref log-probs, values
    @torch.no_grad()
    def fill_old_and_ref(self, rollout: Rollout) -> Rollout:
        from alignctl.models.value_head import full_kl_per_token, reference_logps

        cfg = self.cfg
        model = self.model
        was_training = model.training
        model.eval()
        logprobs, values, ref_logprobs, kls = [], [], [], []
        try:
            for start in range(0, len(rollout), cfg.mini_batch_size):
                part = rollout.select(torch.arange(start, min(start + cfg.mini_batch_size, len(rollout))))
                with self.accelerator.autocast():
                    out = model(part)
                    ref = reference_logps(self.reference, part, temperature=self.temperature, chunk_size=self.chunk_size)
                    if cfg.kl_penalty == "full":
                        policy = self.accelerator.unwrap_model(model).policy
                        kls.append(full_kl_per_token(policy, self.reference, part, temperature=self.temperature,
                                                     chunk_size=self.chunk_size))
                logprobs.append(out["logprobs"].float())
                values.append(out["values"].float())
                ref_logprobs.append(ref.float())
        finally:
            model.train(was_training)
        rollout.logprobs, rollout.values = torch.cat(logprobs), torch.cat(values)
        rollout.ref_logprobs = torch.cat(ref_logprobs)
        self._full_kl = torch.cat(kls) if kls else None
        return rollout

    # ------------------------------------------------------------------ phase 2: rewards and advantages
    def compute_advantages(self, rollout: Rollout, raw_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        mask = rollout.response_mask.float()
        scores = raw_scores.float().to(mask.device)
        if cfg.missing_eos_penalty is not None and rollout.finished is not None:
            scores = scores - cfg.missing_eos_penalty * (~rollout.finished.to(mask.device)).float()
        scores = scale_scores(
            scores, self._gathering_running(), use_score_scaling=cfg.use_score_scaling,
            use_score_norm=cfg.use_score_norm, score_clip=cfg.score_clip,
        )
        rewards, non_score, kl = per_token_rewards(
            scores, rollout.logprobs, rollout.ref_logprobs, mask, self.kl_ctl.value,
            kind="kl" if cfg.kl_penalty == "full" else cfg.kl_penalty, kl=self._full_kl,
        )
        values, advantages, returns = gae_advantages(rollout.values, rewards, mask, cfg.gamma, cfg.lam, cfg.whiten_rewards)
        rollout.scores, rollout.values, rollout.advantages, rollout.returns = scores, values, advantages, returns
        kl_per_row = (kl * mask).sum(-1)
        return {
            "objective/kl": kl_per_row.mean(),
            "objective/kl_coef": torch.tensor(self.kl_ctl.value),
            "objective/entropy": (-rollout.logprobs * mask).sum(-1).mean(),
            "ppo/mean_non_score_reward": masked_mean(non_score, mask),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": scores.std() if scores.numel() > 1 else torch.zeros(()),
            "env/reward_mean": raw_scores.float().mean(),
            "env/reward_std": raw_scores.float().std() if raw_scores.numel() > 1 else torch.zeros(()),
            "tokens/queries_len_mean": rollout.prompt_mask.sum(-1).float().mean(),
            "tokens/responses_len_mean": rollout.response_lengths.float().mean(),
        }

    def _gathering_running(self):
        """Score statistics over every process's scores (all processes scale alike)."""
        if self.accelerator.num_processes == 1:
            return self.running
        running, accelerator = self.running, self.accelerator

        class Gathered:
            def update(self, xs):
                running.update(accelerator.gather(xs.detach().reshape(-1)))

            def __getattr__(self, name):
                return getattr(running, name)

        return Gathered()

    # ------------------------------------------------------------------ phase 3: update epochs
    def train_on(self, rollout: Rollout) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cfg, accelerator = self.cfg, self.accelerator
        collected: Dict[str, List[torch.Tensor]] = {}
        losses: List[torch.Tensor] = []
        skipped = 0
        self.model.train()
        for _epoch in range(cfg.ppo_epochs):
            last_stats = None
            for part in rollout.minibatches(cfg.mini_batch_size):
                part = part.trimmed()
                with accelerator.accumulate(self.model):
                    with accelerator.autocast():
                        out = self.model(part, with_entropy=True)
                    result = ppo_loss(
                        out["logprobs"], part.logprobs, part.values, out["values"], part.advantages, part.returns,
                        part.response_mask.float(), cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                        vf_coef=cfg.vf_coef, ratio_threshold=cfg.ratio_threshold, entropy=out["entropy"],
                    )
                    if not loss_is_finite(result.loss, accelerator):
                        if self.on_nonfinite is None:
                            raise FloatingPointError(f"non-finite PPO loss {float(result.loss)}")
                        self.on_nonfinite(result.loss, part.row_index.tolist())
                        continue
                    accelerator.backward(result.loss)
                    if accelerator.sync_gradients and self.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                skipped += int(result.skipped)
                losses.append(result.loss.detach())
                for key, value in result.stats.items():
                    collected.setdefault(key, []).append(value)
                last_stats = result.stats
            if cfg.early_stopping and last_stats is not None and self._policy_kl_too_high(last_stats["policy/policykl"]):
                break
        stats = {f"ppo/{k}": torch.stack(v).float().mean() for k, v in collected.items()}
        if "ppo/val/error" in stats and "ppo/returns/var" in stats:
            stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"].clamp(min=1e-12)
        stats["ppo/skipped_minibatches"] = torch.tensor(float(skipped))
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        return loss, stats

    def _policy_kl_too_high(self, policykl: torch.Tensor) -> bool:
        value = policykl.detach().float().to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="mean")
        if float(value) > 1.5 * self.cfg.target_kl:
            self.optimizer.zero_grad(set_to_none=True)
            return True
        return False

    # ------------------------------------------------------------------ all phases
    def step(self, rollout: Rollout, raw_scores: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Phases 1-4 on a sampled rollout; returns (mean loss, stats incl. time/ppo/*)."""
        timings = {}
        start = time.perf_counter()
        self.fill_old_and_ref(rollout)
        timings["time/ppo/forward_pass"] = time.perf_counter() - start
        start = time.perf_counter()
        stats = self.compute_advantages(rollout, raw_scores)
        timings["time/ppo/compute_advantages"] = time.perf_counter() - start
        start = time.perf_counter()
        loss, train_stats = self.train_on(rollout)
        timings["time/ppo/optimize_step"] = time.perf_counter() - start
        stats.update(train_stats)
        kl = stats["objective/kl"].detach().float().to(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process moves its controller alike
            kl = self.accelerator.reduce(kl, reduction="mean")
        self.kl_ctl.update(float(kl), self.cfg.batch_size * self.accelerator.num_processes)
        stats.update({k: torch.tensor(v) for k, v in timings.items()})
        return loss, stats

    def state_dict(self) -> Dict[str, Any]:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "running": {k: float(getattr(self.running, k)) for k in ("mean", "std", "var", "count")},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        for key, value in state["running"].items():
            setattr(self.running, key, value)


class PPOAlgorithm(PolicyRolloutAlgorithm):
    """PPO's plug-in for the online loop: a value head on the policy, then ``PPOUpdate``."""

    value_head = True

    def __init__(self, job: DictConfig) -> None:
        super().__init__(job)
        check_ppo_config(self.cfg)

    def setup_update(self, job: DictConfig, loop) -> None:
        self.update = PPOUpdate(
            self.cfg, loop.accelerator, loop.model, loop.optimizer, self.reference,
            temperature=self.generation.temperature, chunk_size=job.train.logps_chunk_size,
            max_grad_norm=job.train.max_grad_norm, on_nonfinite=loop.handle_nonfinite,
        )

    def iteration(self, batch: Dict[str, Any], loop) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        sampled = self.sample(batch, loop)
        loss, stats = self.update.step(sampled.rollout, sampled.total)
        stats["time/ppo/generate"] = torch.tensor(sampled.timings["generate"])
        stats["time/ppo/score"] = torch.tensor(sampled.timings["score"])
        for name, values in sampled.per_source.items():
            stats[f"env/reward/{name}"] = torch.nanmean(values.float())
        units = sampled.rollout.response_mask.sum().cpu()
        stats["generated_tokens_per_s"] = units.float() / max(sampled.timings["generate"], 1e-9)
        self.show_samples(loop, sampled)
        return loss, stats, units

    def save_extras(self, model: torch.nn.Module, folder) -> None:
        from alignctl.models.value_head import save_value_head

        save_value_head(model, folder)

    def state_dict(self) -> Dict[str, Any]:
        return self.update.state_dict()

    def restore(self, state: Dict[str, Any]) -> None:
        self.update.load_state_dict(state)


def validate_job(job: DictConfig) -> None:
    """Everything about a PPO job that can be checked before a run directory is touched."""
    check_online_job(job)
    check_ppo_config(job.algo)


def run_ppo(job: DictConfig) -> RunResult:
    validate_job(job)
    return run_online(job, PPOAlgorithm(job), title=f"ppo ({'adaptive' if job.algo.adap_kl_ctrl else 'fixed'} KL)")
