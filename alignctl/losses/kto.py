"""Kahneman-Tversky Optimization loss, as TRL's ``KTOTrainer.kto_loss`` (0.12/0.13).

Ethayarajh et al. 2024, eq. 7 (``loss_type="kto"``); ``"apo_zero_unpaired"`` is the unpaired APO-zero
variant (D'Oosterlinck et al. 2024), which uses no KL term. With ``z0`` the KL estimate:

- desirable:   ``desirable_weight   * (1 - sigmoid(beta * (logratio - z0)))``
- undesirable: ``undesirable_weight * (1 - sigmoid(beta * (z0 - logratio)))``

``z0 = clamp(kl_reduce(mean(policy_KL - ref_KL).detach()), min=0)``: the KL estimate is a detached
constant, so no gradient flows through it. TRL reduces the batch loss with ``losses.nanmean()``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    """``losses``: weighted desirable losses then weighted undesirable losses ([n_d + n_u]);
    ``chosen_rewards``/``rejected_rewards``: detached ``beta * logratio`` ([n_d], [n_u]);
    ``kl``: the detached, clamped KL estimate (0-dim)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kl: torch.Tensor


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    policy_kl_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    kl_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> KTOLossOutput:
    """Per-example KTO losses; desirable/undesirable halves may be empty (shape [0]).

    ``kl_reduce`` maps this process's 0-dim KL mean to the global one (TRL: gather across
    processes; a returned vector is averaged); it runs before the clamp, as in TRL.
    KL logps are ignored (KL = 0) for ``apo_zero_unpaired``; for ``kto`` they are required.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; valid names: {', '.join(KTO_LOSS_TYPES)}")

    ref = chosen_logps if chosen_logps.numel() else rejected_logps
    if loss_type == "kto":
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("kto loss needs policy_kl_logps and ref_kl_logps (the mismatched-pair KL batch)")
        kl = kl_reduce((policy_kl_logps - ref_kl_logps).mean().detach()).mean().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=ref.dtype, device=ref.device)

    empty = ref.new_zeros(0)
    if chosen_logps.numel():
        chosen_ratio = chosen_logps - ref_chosen_logps
        if loss_type == "kto":
            chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
        else:
            chosen_losses = 1 - torch.sigmoid(beta * chosen_ratio)
        chosen_rewards = beta * chosen_ratio.detach()
    else:
        chosen_losses, chosen_rewards = empty, empty

    if rejected_logps.numel():
        rejected_ratio = rejected_logps - ref_rejected_logps
        if loss_type == "kto":
            rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
        else:
            rejected_losses = torch.sigmoid(beta * rejected_ratio)
        rejected_rewards = beta * rejected_ratio.detach()
    else:
        rejected_losses, rejected_rewards = empty, empty

    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return KTOLossOutput(losses, chosen_rewards, rejected_rewards, kl)
