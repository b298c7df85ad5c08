"""Pairwise preference losses of the DPO family (pure tensor math, no I/O, no models).

Numerically matches ``DPOTrainer.dpo_loss`` of TRL 0.12.2 / 0.13.0 (``discopop`` is from 0.13.0;
``kto_pair`` is from TRL 0.8.6, the last release that shipped it). Inputs are per-sequence
log-probs of shape ``[B]`` (summed over completion tokens; TRL averages them per token for ``ipo``,
so pass averaged log-probs for ``ipo`` to reproduce TRL runs).

Loss types (``u = beta * logits``, ``logits = (pi_c - pi_r) - (ref_c - ref_r)``):

- ``sigmoid``   DPO, Rafailov et al. 2023 eq. 7; with label_smoothing = cDPO (Mitchell 2023).
- ``hinge``     SLiC-HF, Zhao et al. 2023 eq. 4: ``relu(1 - u)``.
- ``ipo``       IPO, Azar et al. 2023 eq. 17: ``(logits - 1/(2 beta))**2``.
- ``robust``    rDPO, Chowdhury et al. 2024 eq. 8: unbiased noisy-label loss.
- ``exo_pair``  EXO, Ji et al. 2024 eq. 16: reverse KL to the smoothed label distribution.
- ``kto_pair``  paired KTO, Ethayarajh et al. 2024 (HALOs report eq. 7); losses have shape [2B].
- ``bco_pair``  BCO, Jung et al. 2024 eq. 8: binary classifier with a running reward shift.
- ``sppo_hard`` SPPO, Wu et al. 2024 eq. 4.7 with hard win probability (P=1 winner, 0 loser).
- ``nca_pair``  NCA, Chen et al. 2024 eq. 11 (pairwise noise-contrastive alignment).
- ``aot``       AOT, Melnyk et al. 2024: sigmoid loss on within-batch *sorted* log-ratio margins.
- ``aot_pair``  AOT (paired): sorts chosen and rejected implicit rewards separately.
- ``apo_zero``  APO-zero, D'Oosterlinck et al. 2024 eq. 7.
- ``apo_down``  APO-down, D'Oosterlinck et al. 2024 eq. 8.
- ``discopop``  DiscoPOP (log-ratio modulated loss), Chris Lu et al. 2024 eq. 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Union

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "kto_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
)

# TRL silently replaces label_smoothing == 0 by this value for exo_pair (log(0) would be -inf).
EXO_DEFAULT_EPSILON = 1e-3


class DPOLossOutput(NamedTuple):
    """Result of :func:`dpo_loss`.

    ``losses``: per-example losses (shape [B]; [2B] for ``kto_pair``, chosen half first).
    ``chosen_rewards`` / ``rejected_rewards``: ``beta * (policy - ref)``, detached, shape [B].
    ``reward_mean``: detached mean of ``cat(chosen_rewards, rejected_rewards)`` (0-dim); this is
    the value BCO's running mean is updated with.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_mean: torch.Tensor


class _MeanTracker(Protocol):
    mean: float

    def update(self, xs: torch.Tensor) -> object: ...


@dataclass
class RunningMoments:
    """Running mean/variance of a stream of scalars (same update rule as TRL's ``RunningMoments``).

    ``bco_pair`` folds in one value per batch (the 0-dim reward mean), so ``count`` grows by one
    per step. Single-process version: for distributed runs pass :func:`dpo_loss` a tracker whose
    ``update`` all-gathers ``xs`` first (TRL's count then grows by the world size per step), so
    every rank holds the same statistics. Checkpoint ``mean``/``var``/``std``/``count`` to resume.
    """

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        """Fold the values ``xs`` (any shape) into the running statistics."""
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs.detach(), unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        new_var = (old_sum + xs_var * xs_count) / tot_count
        self.mean += (delta * xs_count / tot_count).item()
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count


def _smoothed_sigmoid_loss(u: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigma(u) - eps log sigma(-u)`` (cDPO / AOT form)."""
    return -F.logsigmoid(u) * (1 - label_smoothing) - F.logsigmoid(-u) * label_smoothing


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
    running_mean: Union[None, float, torch.Tensor, _MeanTracker] = None,
) -> DPOLossOutput:
    """Per-example preference loss for ``loss_type`` (see module docstring), exactly as TRL.

    ``reference_free`` (TRL convention) only zeroes the reference term inside the ``sigmoid``,
    ``hinge``, ``ipo``, ``robust``, ``exo_pair`` logits and the ``apo_*`` log-ratios; the other
    loss types and the returned rewards always use the ``ref_*`` tensors given. A caller that has
    no reference model should therefore pass zeros, which makes everything reference-free.

    ``running_mean`` (``bco_pair`` only) is the reward shift ``delta``:

    - an object with ``update(xs)`` and ``.mean`` (e.g. :class:`RunningMoments`): updated in
      place with this batch's rewards *before* use, as TRL does; keep one per run;
    - a float / 0-dim tensor: used as ``delta`` as is (the caller has already folded this batch
      in, e.g. with the ``reward_mean`` of a previous no-grad call);
    - ``None``: a fresh tracker, i.e. ``delta`` = this batch's ``reward_mean``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; valid names: {', '.join(DPO_LOSS_TYPES)}")

    chosen_ratio = chosen_logps - ref_chosen_logps  # log pi/ref on chosen, never reference-free
    rejected_ratio = rejected_logps - ref_rejected_logps
    policy_margin = chosen_logps - rejected_logps
    ref_margin = ref_chosen_logps - ref_rejected_logps
    logits = policy_margin if reference_free else policy_margin - ref_margin

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    reward_mean = torch.cat((chosen_rewards, rejected_rewards), 0).mean()

    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * logits, eps)
    elif loss_type == "robust":
        u = beta * logits
        losses = (-F.logsigmoid(u) * (1 - eps) + F.logsigmoid(-u) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        eps = eps if eps != 0 else EXO_DEFAULT_EPSILON
        u = beta * logits
        losses = torch.sigmoid(u) * (F.logsigmoid(u) - math.log(1 - eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps)
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        # KL of one half is estimated from the other half; not detached, not reference-free (TRL 0.8.6).
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl))
        rejected_losses = 1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))
        losses = torch.cat((chosen_losses, rejected_losses), 0)
    elif loss_type == "bco_pair":
        if running_mean is None:
            running_mean = RunningMoments()
        if hasattr(running_mean, "update"):
            running_mean.update(reward_mean)
            delta = running_mean.mean
        else:
            delta = running_mean
        losses = -F.logsigmoid(beta * chosen_ratio - delta) - F.logsigmoid(-(beta * rejected_ratio - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        rc, rr = beta * chosen_ratio, beta * rejected_ratio
        losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "aot":
        policy_sorted, _ = torch.sort(policy_margin, dim=0)
        ref_sorted, _ = torch.sort(ref_margin, dim=0)
        losses = _smoothed_sigmoid_loss(beta * (policy_sorted - ref_sorted), eps)
    elif loss_type == "aot_pair":
        chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)
        rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)
        losses = _smoothed_sigmoid_loss(beta * (chosen_sorted - rejected_sorted), eps)
    elif loss_type in ("apo_zero", "apo_down"):
        c = chosen_logps if reference_free else chosen_ratio
        r = rejected_logps if reference_free else rejected_ratio
        if loss_type == "apo_zero":  # raise chosen, lower rejected
            losses = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
        else:  # lower chosen, lower rejected more
            losses = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
    else:  # discopop: always uses the reference (TRL ignores reference_free here)
        u = beta * (policy_margin - ref_margin)
        mix = torch.sigmoid(u / discopop_tau)
        losses = -F.logsigmoid(u) * (1 - mix) + torch.exp(-u) * mix

    return DPOLossOutput(losses, chosen_rewards, rejected_rewards, reward_mean)
