"""Contrastive Preference Optimization losses (reference-free), as TRL's ``CPOTrainer`` (0.12/0.13).

``logits = pi_chosen - pi_rejected`` (no reference model). Loss types:

- ``sigmoid`` CPO, Xu et al. 2024 eq. 3 (label_smoothing gives the conservative variant).
- ``hinge``   SLiC-style ``relu(1 - beta * logits)``.
- ``ipo``     IPO, Azar et al. 2023 eq. 17 on the CPO logits.
- ``simpo``   SimPO, Meng et al. 2024 eq. 6: sigmoid loss with target margin ``simpo_gamma``.

TRL feeds *average per-token* log-probs for ``ipo`` and ``simpo`` and summed log-probs for
``sigmoid``/``hinge``: the caller must pass averaged logps for ``simpo`` (and ``ipo``) to get SimPO.
The total is ``losses.mean() + cpo_alpha * nll_chosen`` (``cpo_alpha=0`` with ``simpo`` is pure
SimPO; TRL's default ``cpo_alpha`` is 1.0, i.e. CPO-SimPO).

``alpha`` (AlphaPO, Gupta et al. 2025; TRL 1.16.0 ``trl.experimental.cpo``, added in 0.22): each
answer's reward ``log p`` becomes ``(1 - p^-alpha) / alpha`` (``p = exp(logps)``, so averaged
log-probs for simpo/ipo) for every loss type; the logged rewards are ``beta`` times it. ``alpha = 0``
is the plain loss. (TRL's ``loss_type="alphapo"`` is ``simpo`` with ``cpo_alpha=0`` and an alpha.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


class CPOLossOutput(NamedTuple):
    """``loss``: 0-dim total; ``losses``: per-example preference losses [B]; ``nll_loss``: the
    unweighted chosen NLL that was added (0 when ``cpo_alpha == 0``); detached
    ``chosen_rewards``/``rejected_rewards`` = ``beta * logps``."""

    loss: torch.Tensor
    losses: torch.Tensor
    nll_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_chosen: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
) -> CPOLossOutput:
    """CPO/SimPO preference loss plus ``cpo_alpha`` times the chosen-response NLL (0-dim tensor).

    As TRL, the NLL is dropped (reported as 0) when ``cpo_alpha == 0``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; valid names: {', '.join(CPO_LOSS_TYPES)}")

    if alpha != 0.0:  # p^-alpha = exp(-alpha * log p)
        chosen_scores = (1 - torch.exp(-alpha * chosen_logps)) / alpha
        rejected_scores = (1 - torch.exp(-alpha * rejected_logps)) / alpha
    else:
        chosen_scores, rejected_scores = chosen_logps, rejected_logps
    logits = chosen_scores - rejected_scores
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta  # beta * logits - gamma inside the sigmoid
        u = beta * logits
        losses = -F.logsigmoid(u) * (1 - label_smoothing) - F.logsigmoid(-u) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2

    nll_loss = torch.zeros((), dtype=losses.dtype, device=losses.device) if cpo_alpha == 0 else nll_chosen
    loss = losses.mean() + cpo_alpha * nll_loss
    return CPOLossOutput(loss, losses, nll_loss, beta * chosen_scores.detach(), beta * rejected_scores.detach())
