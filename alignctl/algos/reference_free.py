"""CPO (with SimPO) and ORPO: pairwise losses with no reference model, plus an NLL term on chosen."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.errors import ConfigError
from alignctl.engine.offline import Metrics, PreparedData, RunResult, run_offline
from alignctl.algos.preference import (
    forward_pairs,
    logp_metrics,
    prepare_pair_data,
    reward_metrics,
    split_pairs,
)
from alignctl.algos.padding_free import use_padding_free
from alignctl.losses.cpo import CPO_LOSS_TYPES, cpo_loss
from alignctl.losses.orpo import odds_ratio_loss, orpo_total_loss
from alignctl.models.logps import CausalLMWithLogps, TokenLogps
from alignctl.models.moe import router_aux_coef
from alignctl.models.policy import build_policy
from alignctl.models.reference import disable_dropout


class _PolicyOnlyPairs:
    """Pairwise data and a policy, no reference: the part CPO and ORPO share."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        return prepare_pair_data(job, tokenizer)

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        policy = build_policy(job, tokenizer)
        disable_dropout(policy)
        model = CausalLMWithLogps(policy, chunk_size=job.train.logps_chunk_size)
        self.aux_coef = router_aux_coef(job.algo.router_aux_loss_coef, model.config, follow_config_flag=True)
        model.router_aux = self.aux_coef != 0.0
        return model

    def add_router_loss(self, loss: torch.Tensor, out: TokenLogps, metrics: Metrics) -> torch.Tensor:
        """``loss + router_aux_loss_coef * aux_loss`` for a mixture-of-experts model (see models.moe)."""
        if not self.aux_coef:
            return loss
        metrics["aux_loss"] = out.aux_loss.detach()
        return loss + self.aux_coef * out.aux_loss

    def setup(self, job, accelerator, model, data) -> None:
        use_padding_free(job, data, model)

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model


def chosen_nll(out: TokenLogps) -> torch.Tensor:
    """Mean NLL over the chosen answers' tokens of the batch (cross-entropy on the chosen half)."""
    chosen_sum, _ = split_pairs(out.sum_logps)
    chosen_n, _ = split_pairs(out.num_tokens)
    return -chosen_sum.sum() / chosen_n.sum().clamp(min=1).to(chosen_sum.dtype)


class CPOAlgorithm(_PolicyOnlyPairs):
    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        if self.cfg.loss_type not in CPO_LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={self.cfg.loss_type!r}: use one of {', '.join(CPO_LOSS_TYPES)}")
        return super().prepare_data(job, tokenizer)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        out = forward_pairs(model, batch)
        # SimPO and IPO compare length-normalised log-probs.
        logps = out.mean_logps if cfg.loss_type in ("simpo", "ipo") else out.sum_logps
        chosen, rejected = split_pairs(logps)
        result = cpo_loss(
            chosen,
            rejected,
            chosen_nll(out),
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
            cpo_alpha=cfg.cpo_alpha,
            alpha=cfg.alpha,
        )
        metrics = {**reward_metrics(result.chosen_rewards, result.rejected_rewards), **logp_metrics(out)}
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen.detach().mean(), rejected.detach().mean()
        metrics["nll_loss"] = result.nll_loss.detach()
        return self.add_router_loss(result.loss, out, metrics), metrics


class ORPOAlgorithm(_PolicyOnlyPairs):
    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        out = forward_pairs(model, batch)
        chosen, rejected = split_pairs(out.mean_logps)
        nll = chosen_nll(out)
        result = odds_ratio_loss(chosen, rejected, beta=self.cfg.beta)
        metrics = {**reward_metrics(result.chosen_rewards, result.rejected_rewards), **logp_metrics(out)}
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen.detach().mean(), rejected.detach().mean()
        metrics["nll_loss"] = nll.detach()
        metrics["log_odds_ratio"] = result.log_odds_ratio.detach()
        metrics["log_odds_chosen"] = result.log_odds_chosen.detach()
        return self.add_router_loss(orpo_total_loss(nll, result.losses), out, metrics), metrics


def run_cpo(job: DictConfig) -> RunResult:
    return run_offline(job, CPOAlgorithm(job.algo), title=f"cpo ({job.algo.loss_type})")


def run_orpo(job: DictConfig) -> RunResult:
    return run_offline(job, ORPOAlgorithm(job.algo), title="orpo")
