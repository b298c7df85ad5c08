"""Reward modelling: a one-output sequence classifier trained on preference pairs.

Loss (Bradley-Terry, with the optional Llama-2 margin): -log sigmoid(r_chosen - r_rejected - margin),
plus center_rewards_coefficient * mean((r_chosen + r_rejected)^2) when set. The saved model loads
with AutoModelForSequenceClassification, which is how PPO, RLOO and GRPO take a reward model.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from omegaconf import DictConfig

from alignctl.algos.padding_free import use_padding_free
from alignctl.engine.offline import Metrics, PreparedData, RunResult, run_offline
from alignctl.algos.preference import prepare_pair_data, split_pairs
from alignctl.losses.reward import reward_accuracy, reward_loss
from alignctl.models.policy import build_policy
from alignctl.models.reference import disable_dropout
from alignctl.models.reward_scorer import RewardScorer, enable_scorer_padding_free, scorer_padding_free_support


class RewardAlgorithm:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData:
        return prepare_pair_data(job, tokenizer)

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        model = build_policy(job, tokenizer, reward_head=True)
        # As the reference library's RewardTrainer (disable_dropout=True): deterministic rewards,
        # and no dropout masks kept for backward.
        disable_dropout(model)
        return RewardScorer(model)

    def setup(self, job, accelerator, model, data) -> None:
        use_padding_free(job, data, model, support=scorer_padding_free_support, enable=enable_scorer_padding_free)

    def compute_loss(self, model, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]:
        rewards = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            cu_seq_lens=batch.get("cu_seq_lens"),
        )
        chosen, rejected = split_pairs(rewards)
        loss = reward_loss(
            chosen,
            rejected,
            margin=batch.get("margin"),
            center_rewards_coefficient=self.cfg.center_rewards_coefficient,
        )
        detached_c, detached_r = chosen.detach(), rejected.detach()
        return loss, {
            "accuracy": reward_accuracy(detached_c, detached_r).float().mean(),
            "rewards/chosen": detached_c.mean(),
            "rewards/rejected": detached_r.mean(),
            "rewards/margins": (detached_c - detached_r).mean(),
        }

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model


def run_reward(job: DictConfig) -> RunResult:
    return run_offline(job, RewardAlgorithm(job.algo), title="reward model")
