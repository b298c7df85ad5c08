"""ORPO odds-ratio term, as TRL's ``ORPOTrainer.odds_ratio_loss`` (0.12/0.13).

Hong et al. 2024, eqs. 4 and 7: with ``p = exp(logp)`` the average per-token likelihood,
``log odds(y) = logp - log(1 - p)`` and the odds-ratio term is ``log sigmoid(log odds_c - log odds_r)``.

TRL sign convention: the per-example "losses" it returns are ``beta * log sigmoid(log_odds)``
(<= 0, a *reward*), and the total is ``nll_chosen - losses.mean()``, i.e. ``L_SFT + beta * L_OR``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ORPOLossOutput(NamedTuple):
    """``losses``: ``beta * log sigmoid(log_odds)`` per example [B] (non-positive);
    ``chosen_rewards``/``rejected_rewards``: detached ``beta * logps``;
    ``log_odds_ratio``: ``mean(log sigmoid(log_odds))`` (no beta, TRL's metric name);
    ``log_odds_chosen``: ``mean(log_odds)`` (TRL's metric name for the raw log odds ratio)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor


def odds_ratio_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1
) -> ORPOLossOutput:
    """ORPO odds-ratio term from AVERAGE per-token log-probs (shape [B], all < 0)."""
    log_odds = (chosen_logps - rejected_logps) - (
        torch.log1p(-torch.exp(chosen_logps)) - torch.log1p(-torch.exp(rejected_logps))
    )
    ratio = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        beta * ratio,
        beta * chosen_logps.detach(),
        beta * rejected_logps.detach(),
        ratio.mean(),
        log_odds.mean(),
    )


def orpo_total_loss(nll_chosen: torch.Tensor, odds_ratio_losses: torch.Tensor) -> torch.Tensor:
    """ORPO objective as TRL forms it: ``nll_chosen - odds_ratio_losses.mean()``."""
    return nll_chosen - odds_ratio_losses.mean()
