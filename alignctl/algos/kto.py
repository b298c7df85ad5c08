"""KTO (Kahneman-Tversky optimisation) on the offline driver, as TRL's ``KTOTrainer`` (0.11-0.12).

Each batch is one forward pass over ``[main; KL]`` rows (``alignctl.data.kto.collate_kto``): the
main rows give the desirable / undesirable log-ratios, the KL rows (each prompt followed by another
example's completion, a pairing fixed when the data is built) give the detached KL estimate ``z0``.
The reference is held as for DPO (frozen copy, LoRA adapter switched off, ``model.ref_name_or_path``,
or precomputed log-probs of both the main and the KL sequences).

Loss: ``kto_loss`` per example (desirable then undesirable), reduced with ``losses.nanmean()``
like TRL: the mean over the examples present, so a batch with only one kind is the mean over that
kind. With ``loss_type=apo_zero_unpaired`` no KL rows are built (TRL's ``calculate_KL=False``).
When the data set has a single example there is no mismatched pair and the KL estimate is 0.

Metrics (names as TRL's): ``kl``; ``rewards/chosen``, ``logps/chosen``, ``logits/chosen`` over the
desirable examples, ``.../rejected`` over the undesirable ones, ``rewards/margins``. Per-kind values
are weighted by the number of examples of that kind (``Weighted`` in engine/window.py), so the
logged value is the exact mean over the logging window and the processes, as TRL logs it, however
the kinds fall into micro-batches; a window without one kind logs nothing for it (never NaN).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.data.kto import build_kto_examples, collate_kto, warn_if_unbalanced
from alignctl.errors import ConfigError
from alignctl.engine.offline import PreparedData, RunResult, run_offline
from alignctl.engine.window import Metrics, Weighted
from alignctl.algos.preference import (
    attach_reference,
    choose_reference_precompute,
    build_policy_with_reference,
    build_splits,
    forward_pairs,
)
from alignctl.algos.padding_free import use_padding_free
from alignctl.losses.kto import KTO_LOSS_TYPES, KTOLossOutput, kto_loss
from alignctl.models.logps import TokenLogps
from alignctl.models.reference import ReferenceModel

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class KTOAlgorithm:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.reference: ReferenceModel | None = None
        self.autocast = None
        self.kl_reduce = _identity

    @property
    def uses_kl(self) -> bool:
        return self.cfg.loss_type == "kto"

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        cfg = job.algo
        if cfg.loss_type not in KTO_LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={cfg.loss_type!r}: use one of {', '.join(KTO_LOSS_TYPES)}")
        for name in ("desirable_weight", "undesirable_weight"):
            if cfg[name] < 0:
                raise ConfigError(f"algo.{name}={cfg[name]}: must be >= 0")
        raw, train, eval_data = build_splits(job, tokenizer, build_kto_examples, kl_pairs=self.uses_kl)
        counts = f"{train.num_desirable} desirable + {train.num_undesirable} undesirable train examples"
        if eval_data:
            counts += f", {len(eval_data.examples)} eval"
        notes = [("data", f"{raw.source} ({train.format}, {counts})")]
        if train.converted:
            notes.append(("pairs converted", "chosen -> desirable (label true), rejected -> undesirable (label false)"))
        if train.skipped:
            notes.append(("skipped rows", f"{train.skipped} (dataset.skip_invalid=true)"))
        if self.uses_kl:
            if train.kl_shift:
                kl_note = f"prompt i + completion of example i+{train.kl_shift} (fixed)"
                if train.kl_same_prompt:
                    kl_note += f"; {train.kl_same_prompt} pairs share their prompt (duplicated prompts)"
            else:
                kl_note = "one example: no mismatched pair, KL estimate 0"
            notes.append(("KL pairs", kl_note))
        advice = warn_if_unbalanced(train, cfg.desirable_weight, cfg.undesirable_weight)
        if advice:
            notes.append(("warning", advice))
        data = PreparedData(
            train=train.examples,
            eval=eval_data.examples if eval_data else None,
            collate=partial(collate_kto, pad_token_id=tokenizer.pad_token_id, with_kl=self.uses_kl),
            notes=notes,
            eval_origin=raw.eval_origin,
        )
        choose_reference_precompute(job, data)
        return data

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        model, self.reference = build_policy_with_reference(job, tokenizer, reference_free=False)
        return model

    def setup(self, job: DictConfig, accelerator, model: torch.nn.Module, data: PreparedData) -> None:
        self.autocast = accelerator.autocast
        if accelerator.num_processes > 1:
            # The KL estimate is the mean over all processes' KL rows (TRL gathers them).
            self.kl_reduce = lambda x: accelerator.reduce(x, reduction="mean")
        use_padding_free(job, data, model, self.reference.model if self.reference.mode == "copy" else None)
        attach_reference(self.reference, job, accelerator, model, data)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        out = forward_pairs(model, batch)  # one forward of all [main; KL] rows
        policy_logps = out.sum_logps
        ref_logps = self.reference.sum_logps(batch, autocast=self.autocast).to(policy_logps.dtype)
        desirable = batch["label"].to(torch.bool)
        n = desirable.shape[0]
        policy_main, ref_main = policy_logps[:n], ref_logps[:n]
        policy_kl = ref_kl = None
        if self.uses_kl:
            if policy_logps.shape[0] == 2 * n:
                policy_kl, ref_kl = policy_logps[n:], ref_logps[n:]
            else:  # a one-example data set: no mismatched pair, KL estimate 0
                policy_kl = ref_kl = policy_logps.new_zeros(1)
        result = kto_loss(
            policy_main[desirable],
            policy_main[~desirable],
            ref_main[desirable],
            ref_main[~desirable],
            policy_kl,
            ref_kl,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            loss_type=cfg.loss_type,
            kl_reduce=self.kl_reduce,
        )
        return result.losses.nanmean(), kto_metrics(result, out, desirable)

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model


def kto_metrics(result: KTOLossOutput, out: TokenLogps, desirable: torch.Tensor) -> Metrics:
    """TRL's metric names. Per-kind values are weighted by how many examples of that kind a
    micro-batch holds, so the logged value is the exact mean over the logging window (and the
    processes); a window without one kind logs nothing for it."""
    n = desirable.shape[0]
    logps = out.sum_logps[:n].detach()
    logits_sum, tokens = out.logits_sum[:n], out.num_tokens[:n]
    metrics: Metrics = {"kl": result.kl.detach().float()}
    kinds = (("chosen", desirable, result.chosen_rewards), ("rejected", ~desirable, result.rejected_rewards))
    for kind, mask, rewards in kinds:
        count = mask.sum().float()
        metrics[f"rewards/{kind}"] = Weighted(rewards.detach().sum(), count)
        metrics[f"logps/{kind}"] = Weighted(logps[mask].sum(), count)
        metrics[f"logits/{kind}"] = Weighted(logits_sum[mask].sum(), tokens[mask].sum().float())
    both = result.chosen_rewards.numel() > 0 and result.rejected_rewards.numel() > 0
    if both:
        margin = result.chosen_rewards.detach().mean() - result.rejected_rewards.detach().mean()
        metrics["rewards/margins"] = Weighted(margin, margin.new_ones(()))
    else:
        metrics["rewards/margins"] = Weighted(logps.new_zeros(()), logps.new_zeros(()))
    return metrics


def run_kto(job: DictConfig) -> RunResult:
    return run_offline(job, KTOAlgorithm(job.algo), title=f"kto ({job.algo.loss_type})")
