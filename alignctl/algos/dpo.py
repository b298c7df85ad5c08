"""DPO (and its loss variants) on the offline driver."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.errors import ConfigError
from alignctl.engine.offline import Metrics, PreparedData, RunResult, run_offline
from alignctl.algos.preference import (
    attach_reference,
    build_policy_with_reference,
    forward_pairs,
    logp_metrics,
    prepare_pair_data,
    reward_metrics,
    split_pairs,
)
from alignctl.losses.dpo import DPO_LOSS_TYPES, RunningMoments, dpo_loss
from alignctl.models.reference import ReferenceModel

# Loss types whose log-probs are per-token averages rather than sums (as the reference library).
AVERAGED_LOSS_TYPES = ("ipo",)


class GatheredMoments(RunningMoments):
    """bco_pair's running statistics fed with every process's batch reward mean (as the reference
    library gathers them), so all processes hold the same running mean."""

    def __init__(self, accelerator) -> None:
        super().__init__()
        self._accelerator = accelerator

    def update(self, xs: torch.Tensor) -> None:
        super().update(self._accelerator.gather(xs.detach().reshape(-1)))


class DPOAlgorithm:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.reference: ReferenceModel | None = None
        self.running = RunningMoments()  # bco_pair's running reward mean
        self.autocast = None

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        if job.algo.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={job.algo.loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
        return prepare_pair_data(job, tokenizer)

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        model, self.reference = build_policy_with_reference(job, tokenizer, reference_free=job.algo.reference_free)
        return model

    def setup(self, job: DictConfig, accelerator, model: torch.nn.Module, data: PreparedData) -> None:
        self.autocast = accelerator.autocast
        if accelerator.num_processes > 1:
            self.running = GatheredMoments(accelerator)
        attach_reference(self.reference, job, accelerator, model, data)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        out = forward_pairs(model, batch)
        policy_logps = out.sum_logps
        ref_logps = self.reference.sum_logps(batch, autocast=self.autocast)
        if cfg.loss_type in AVERAGED_LOSS_TYPES:
            counts = out.num_tokens.clamp(min=1).to(policy_logps.dtype)
            policy_logps, ref_logps = policy_logps / counts, ref_logps / counts
        chosen, rejected = split_pairs(policy_logps)
        ref_chosen, ref_rejected = split_pairs(ref_logps.to(policy_logps.dtype))
        result = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            reference_free=cfg.reference_free,
            discopop_tau=cfg.discopop_tau,
            # Evaluation reads the running mean without moving it.
            running_mean=self.running if train else self.running.mean,
        )
        metrics = {**reward_metrics(result.chosen_rewards, result.rejected_rewards), **logp_metrics(out)}
        if cfg.loss_type in AVERAGED_LOSS_TYPES:
            metrics["logps/chosen"], metrics["logps/rejected"] = chosen.detach().mean(), rejected.detach().mean()
        return result.losses.mean(), metrics

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model

    def state_dict(self) -> Dict[str, float]:
        """bco_pair's running reward statistics (checkpointed for exact resume)."""
        return {k: float(getattr(self.running, k)) for k in ("mean", "std", "var", "count")}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for key, value in state.items():
            setattr(self.running, key, value)


def run_dpo(job: DictConfig) -> RunResult:
    return run_offline(job, DPOAlgorithm(job.algo), title=f"dpo ({job.algo.loss_type})")
