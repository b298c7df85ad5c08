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
- ``sigmoid_norm`` sigmoid on length-normalised scores (TRL 1.16.0, added in 1.x): needs ``lengths``.
- ``sft``       NLL of the chosen answers (MPO's generation term; TRL 1.16.0, added in 0.20): needs
  ``chosen_nll``; every example gets the batch's mean NLL.

Options of the current release (TRL 1.16.0):

- ``f_divergence_type`` (f-DPO, Wang et al. 2023): the log-ratios ``log t`` become the scores
  ``f'(t)`` before the chosen - rejected difference: ``reverse_kl`` ``log t`` (plain DPO),
  ``forward_kl`` ``1 - 1/t``, ``js_divergence`` ``log 2 + log sigma(log t)``, ``alpha_divergence``
  ``(t^(a-1) - 1) / (a - 1)`` (``a = f_alpha_divergence_coef``; ``a = 1`` is reverse_kl; the
  exponent is clamped at 80 in fp32/bf16, 11 in fp16). Allowed for :data:`F_DIVERGENCE_LOSS_TYPES`.
  (TRL <= 0.2x wrote the alpha-divergence as ``(1 - u^-a)/a``: the same at the default a = 0.5.)
- ``lengths`` for ``ipo``: given, the scores are divided by the answer lengths (1.16's form, which
  keeps ``f_divergence_type`` exact); not given, the caller passes per-token-average log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Sequence, Tuple, Union

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
    "sigmoid_norm",
    "sft",
)

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on the chosen - rejected score difference: the only ones f-DPO generalises (TRL 1.16.0).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Loss types whose per-example losses are not one per pair in pair order (sorted or [2B]): no WPO weights.
UNWEIGHTABLE_LOSS_TYPES = ("aot", "aot_pair", "kto_pair")

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


_EXP_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}


def f_divergence_scores(
    chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``f'(t)`` of the policy/reference ratios ``t`` given as log-ratios (TRL 1.16.0's definitions)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return chosen_ratio, rejected_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-chosen_ratio), 1 - torch.exp(-rejected_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_ratio), math.log(2) + F.logsigmoid(rejected_ratio)
    if kind != "alpha_divergence":
        raise ValueError(f"Unknown f_divergence_type {kind!r}; valid names: {', '.join(F_DIVERGENCES)}")

    def score(ratio: torch.Tensor) -> torch.Tensor:
        t = (alpha - 1.0) * ratio
        clamp = _EXP_CLAMP.get(t.dtype, 80.0)  # exp(.) stays representable in the input's dtype
        work = t.to(torch.promote_types(t.dtype, torch.float32))
        return (torch.exp(work.clamp(max=clamp)) - 1.0).to(t.dtype) / (alpha - 1.0)

    return score(chosen_ratio), score(rejected_ratio)


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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    lengths: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    chosen_nll: Optional[torch.Tensor] = None,
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

    ``lengths`` = (chosen, rejected) answer token counts [B] (``sigmoid_norm``; ``ipo``, see the
    module docstring); ``chosen_nll`` (0-dim) is the ``sft`` loss. ``f_divergence_type`` other than
    ``reverse_kl`` only for :data:`F_DIVERGENCE_LOSS_TYPES`.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; valid names: {', '.join(DPO_LOSS_TYPES)}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} works with {', '.join(F_DIVERGENCE_LOSS_TYPES)}, not {loss_type!r}"
        )
    if loss_type == "sigmoid_norm" and lengths is None:
        raise ValueError("loss_type 'sigmoid_norm' needs the answer lengths")
    if loss_type == "sft" and chosen_nll is None:
        raise ValueError("loss_type 'sft' needs chosen_nll")

    chosen_ratio = chosen_logps - ref_chosen_logps  # log pi/ref on chosen, never reference-free
    rejected_ratio = rejected_logps - ref_rejected_logps
    policy_margin = chosen_logps - rejected_logps
    ref_margin = ref_chosen_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":
        logits = policy_margin if reference_free else policy_margin - ref_margin
    else:  # TRL 1.16.0 has no reference_free: the scores always use the reference given
        chosen_scores, rejected_scores = f_divergence_scores(
            chosen_ratio, rejected_ratio, f_divergence_type, f_alpha_divergence_coef
        )
        logits = chosen_scores - rejected_scores
    if loss_type in ("ipo", "sigmoid_norm") and lengths is not None:
        # Per-token average of each answer's score (for reverse_kl: of its log-ratio).
        if f_divergence_type == "reverse_kl":
            chosen_scores = chosen_logps - (0 if reference_free else ref_chosen_logps)
            rejected_scores = rejected_logps - (0 if reference_free else ref_rejected_logps)
        n_chosen, n_rejected = (n.clamp(min=1).to(logits.dtype) for n in lengths)
        logits = chosen_scores / n_chosen - rejected_scores / n_rejected

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
    elif loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "sft":
        losses = chosen_nll.expand(chosen_logps.shape[0])
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
        u = beta * ((policy_margin - ref_margin) if f_divergence_type == "reverse_kl" else logits)
        mix = torch.sigmoid(u / discopop_tau)
        losses = -F.logsigmoid(u) * (1 - mix) + torch.exp(-u) * mix

    return DPOLossOutput(losses, chosen_rewards, rejected_rewards, reward_mean)


class CombinedLossOutput(NamedTuple):
    """Result of :func:`combined_dpo_loss`: ``loss`` (0-dim) = sum of ``weight * part``; ``parts``
    maps each loss type to its unweighted mean (after WPO weighting), detached; rewards as
    :class:`DPOLossOutput` (``beta * log-ratio``, the same whatever the loss types)."""

    loss: torch.Tensor
    parts: dict
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def wpo_weights(chosen_aligned: torch.Tensor, rejected_aligned: torch.Tensor) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024 eq. 2, TRL 1.16.0): ``exp(c) * exp(r)``, detached, where
    ``c``/``r`` are the per-token means over each answer of ``log p(y_t) - log sum_v p(v)^2``.
    (TRL 0.1x-0.2x clamped ``exp(c + r)`` at 1; 1.16.0 does not.)"""
    return (torch.exp(chosen_aligned) * torch.exp(rejected_aligned)).detach()


def combined_dpo_loss(
    loss_types: Sequence[str],
    loss_weights: Sequence[float],
    *args,
    pair_weights: Optional[torch.Tensor] = None,
    **kwargs,
) -> CombinedLossOutput:
    """``sum_i w_i * mean(loss_i * pair_weights)`` over several loss types (MPO: sigmoid + bco_pair
    + sft; RPO: sigmoid + sft), as TRL 1.16.0's list ``loss_type`` with ``loss_weights``.

    ``*args`` / ``**kwargs`` go to :func:`dpo_loss` for every type; ``pair_weights`` [B] are WPO's
    (see :func:`wpo_weights`), applied to each part before its mean.
    """
    if len(loss_types) != len(loss_weights):
        raise ValueError(f"{len(loss_types)} loss types but {len(loss_weights)} weights")
    if pair_weights is not None:
        bad = [t for t in loss_types if t in UNWEIGHTABLE_LOSS_TYPES]
        if bad:
            raise ValueError(f"pair weights (WPO) do not apply to {', '.join(bad)}: their losses are not one per pair")
    total, parts, result = None, {}, None
    for loss_type, weight in zip(loss_types, loss_weights):
        result = dpo_loss(*args, loss_type=loss_type, **kwargs)
        losses = result.losses if pair_weights is None else result.losses * pair_weights
        part = losses.mean()
        parts[loss_type] = part.detach()
        total = part * weight if total is None else total + part * weight
    return CombinedLossOutput(total, parts, result.chosen_rewards, result.rejected_rewards)
