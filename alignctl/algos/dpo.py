"""DPO (and its loss variants) on the offline driver."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.errors import ConfigError
from alignctl.engine.offline import Metrics, PreparedData, RunResult, run_offline
from alignctl.algos.preference import (
    REFERENCE_NOTES,
    attach_reference,
    choose_reference_precompute,
    build_policy_with_reference,
    forward_pairs,
    logp_metrics,
    prepare_pair_data,
    reward_metrics,
    split_pairs,
)
from alignctl.algos.padding_free import use_padding_free
from alignctl.algos.dpo_terms import chosen_nll, ld_logps, wpo_pair_weights
from alignctl.checkpoint import UnreadableCheckpoint
from alignctl.losses.dpo import DPO_LOSS_TYPES, RunningMoments, combined_dpo_loss
from alignctl.models.moe import router_aux_coef
from alignctl.models.reference import ReferenceModel

# The synced reference of TR-DPO, saved beside the model in checkpoints (and the final model).
SYNCED_REFERENCE_FILE = "tr_dpo_reference.safetensors"

# With these among the loss types, the logged rewards and log-probs are per-token averages (as
# TRL <= 0.2x, which fed ipo averaged log-probs; the loss itself normalises by length as TRL 1.16.0).
AVERAGED_LOSS_TYPES = ("ipo",)


def dpo_loss_parts(cfg: DictConfig) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """(loss types, weights) of ``algo.loss_type`` (a name or a list), ``algo.loss_weights``
    (null: 1.0 each) and ``algo.rpo_alpha`` (RPO: an ``sft`` part of that weight, which is how TRL
    <= 0.28's rpo_alpha is written in 1.16.0)."""
    types = (cfg.loss_type,) if isinstance(cfg.loss_type, str) else tuple(cfg.loss_type)
    weights = tuple(float(w) for w in cfg.loss_weights) if cfg.loss_weights is not None else (1.0,) * len(types)
    if cfg.rpo_alpha is not None:
        types, weights = types + ("sft",), weights + (float(cfg.rpo_alpha),)
    return types, weights


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
        self.loss_types, self.loss_weights = dpo_loss_parts(cfg)
        self.aux_coef = 0.0  # router loss weight, set with the model

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        for loss_type in self.loss_types:
            if loss_type not in DPO_LOSS_TYPES:
                raise ConfigError(f"algo.loss_type={loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
        data = prepare_pair_data(job, tokenizer)
        choose_reference_precompute(job, data)
        return data

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        cfg = job.algo
        model, self.reference = build_policy_with_reference(job, tokenizer, reference_free=cfg.reference_free)
        self.aux_coef = router_aux_coef(cfg.router_aux_loss_coef, model.config)
        model.router_aux = self.aux_coef != 0.0
        model.log_sum_sq = bool(cfg.use_weighting)
        if cfg.ld_alpha is not None:  # the reference's log-probs get the same LD weighting (TRL 1.16.0)
            self.reference.reduce = lambda out: ld_logps(out, cfg.ld_alpha)
        if cfg.sync_ref_model and self.reference.mode != "copy":
            raise ConfigError(
                f"algo.sync_ref_model=true needs a held reference model, but this run's reference is "
                f"{REFERENCE_NOTES[self.reference.mode]}; use peft=none without algo.reference_free or "
                "algo.precompute_ref_logps, or set algo.sync_ref_model=false"
            )
        if cfg.sync_ref_model:
            shapes = [p.shape for p in model.model.parameters()]
            if shapes != [p.shape for p in self.reference.model.parameters()]:
                raise ConfigError(
                    "algo.sync_ref_model=true mixes the policy's weights into the reference, but "
                    f"model.ref_name_or_path={job.model.ref_name_or_path} has other weights; drop one of the two"
                )
        return model

    def setup(self, job: DictConfig, accelerator, model: torch.nn.Module, data: PreparedData) -> None:
        self.autocast = accelerator.autocast
        self._unwrap = accelerator.unwrap_model
        if accelerator.num_processes > 1:
            self.running = GatheredMoments(accelerator)
        use_padding_free(job, data, model, self.reference.model if self.reference.mode == "copy" else None)
        attach_reference(self.reference, job, accelerator, model, data)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        out = forward_pairs(model, batch)
        policy_logps = out.sum_logps if cfg.ld_alpha is None else ld_logps(out, cfg.ld_alpha)
        ref_logps = self.reference.sum_logps(batch, autocast=self.autocast).to(policy_logps.dtype)
        chosen, rejected = split_pairs(policy_logps)
        ref_chosen, ref_rejected = split_pairs(ref_logps)
        lengths = split_pairs(out.num_tokens)
        needs_nll = "sft" in self.loss_types
        result = combined_dpo_loss(
            self.loss_types,
            self.loss_weights,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            reference_free=cfg.reference_free,
            discopop_tau=cfg.discopop_tau,
            # Evaluation reads the running mean without moving it.
            running_mean=self.running if train else self.running.mean,
            f_divergence_type=cfg.f_divergence_type,
            f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
            lengths=lengths,
            chosen_nll=chosen_nll(out) if needs_nll else None,
            pair_weights=wpo_pair_weights(out) if cfg.use_weighting else None,
        )
        loss = result.loss
        chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
        metrics = logp_metrics(out)
        if any(t in AVERAGED_LOSS_TYPES for t in self.loss_types):
            n_chosen, n_rejected = (n.clamp(min=1).to(chosen.dtype) for n in lengths)
            chosen_rewards, rejected_rewards = chosen_rewards / n_chosen, rejected_rewards / n_rejected
            metrics["logps/chosen"] = (chosen.detach() / n_chosen).mean()
            metrics["logps/rejected"] = (rejected.detach() / n_rejected).mean()
        metrics.update(reward_metrics(chosen_rewards, rejected_rewards))
        if len(self.loss_types) > 1:
            metrics.update({f"loss/{name}": part for name, part in result.parts.items()})
        if self.aux_coef:
            loss = loss + self.aux_coef * out.aux_loss
            metrics["aux_loss"] = out.aux_loss.detach()
        return loss, metrics

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` optimizer steps, mix the policy into the reference
        (TRL 1.16.0's SyncRefModelCallback, on the global step, before that step's checkpoint)."""
        cfg = self.cfg
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            self.reference.mix_in(self._unwrap(model).model, cfg.ref_model_mixup_alpha)

    def save_extras(self, model: torch.nn.Module, folder) -> None:
        if self.cfg.sync_ref_model:
            from safetensors.torch import save_model

            save_model(self.reference.model, str(Path(folder) / SYNCED_REFERENCE_FILE))

    def load_extras(self, folder) -> None:
        """Restore the synced reference of a checkpoint (TR-DPO), so a resumed run continues exactly."""
        if not self.cfg.sync_ref_model:
            return
        from safetensors.torch import load_file

        path = Path(folder) / SYNCED_REFERENCE_FILE
        try:
            weights = load_file(str(path))
        except Exception as exc:  # missing or corrupt: the checkpoint cannot continue this run
            raise UnreadableCheckpoint(f"{SYNCED_REFERENCE_FILE} cannot be read ({exc})") from None
        state = self.reference.model.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise UnreadableCheckpoint(f"{SYNCED_REFERENCE_FILE} holds weights this reference lacks: {unknown[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                state[name].copy_(value)

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model

    def state_dict(self) -> Dict[str, float]:
        """bco_pair's running reward statistics (checkpointed for exact resume)."""
        return {k: float(getattr(self.running, k)) for k in ("mean", "std", "var", "count")}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for key, value in state.items():
            setattr(self.running, key, value)


def run_dpo(job: DictConfig) -> RunResult:
    types, _ = dpo_loss_parts(job.algo)
    return run_offline(job, DPOAlgorithm(job.algo), title=f"dpo ({' + '.join(types)})")
