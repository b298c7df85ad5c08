"""Pairwise (Bradley-Terry) reward-model loss, as TRL's ``RewardTrainer.compute_loss`` (0.12/0.13).

``loss = mean(-log sigmoid(r_chosen - r_rejected - margin))``
``       + center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)``

(margin: Llama 2, Touvron et al. 2023 eq. 2; centring: Eisenstein et al. 2023, "auxiliary loss").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _per_pair(x: torch.Tensor) -> torch.Tensor:
    """Flatten a ``[B]`` or ``[B, 1]`` (scalar reward head) tensor to ``[B]``."""
    return x.reshape(-1)


def reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: Optional[torch.Tensor] = None,
    center_rewards_coefficient: Optional[float] = None,
) -> torch.Tensor:
    """Mean pairwise reward-model loss (0-dim tensor).

    Rewards may be ``[B]`` or ``[B, 1]``; ``margin`` (one per pair) is ``[B]`` or ``[B, 1]``.
    Each margin is applied to its own pair. (TRL 0.12 subtracts a ``[B]`` margin from ``[B, 1]``
    rewards, which broadcasts to ``[B, B]``; that only coincides with this for ``B == 1``.)
    ``center_rewards_coefficient=None`` (TRL's default) disables the centring term.
    """
    diff = _per_pair(rewards_chosen) - _per_pair(rewards_rejected)
    if margin is not None:
        diff = diff - _per_pair(margin).to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        total = _per_pair(rewards_chosen) + _per_pair(rewards_rejected)
        loss = loss + center_rewards_coefficient * torch.mean(total**2)
    return loss


def reward_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy ``[B]`` (float 0/1); ``.mean()`` for the batch.

    A tie is no preference, so it counts as wrong: ``r_chosen > r_rejected``, as TRL 1.16.0's
    RewardTrainer (0.12/0.13's argmax over ``[chosen, rejected]`` counted a tie as correct).
    """
    return (_per_pair(rewards_chosen) > _per_pair(rewards_rejected)).float()
