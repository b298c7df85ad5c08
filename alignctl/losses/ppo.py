"""Clipped PPO loss and masked statistics (pure tensor math, no I/O, no models).

Numerically matches the classic TRL ``PPOTrainer`` (trl 0.4 - 0.11): ``masked_mean``,
``masked_var``, ``masked_whiten``, ``entropy_from_logits`` and ``PPOTrainer.loss``.

- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clipped surrogate
  objective ``L^CLIP``) and eq. 9 (combined objective with a value-function term).
- The clipped value loss follows the OpenAI baselines / Ziegler et al. 2019 implementation.
- Advantages come from GAE (Schulman et al. 2016), see :mod:`alignctl.rl.advantages`.

All per-token tensors have shape ``[B, R]`` (batch x response tokens); ``mask`` (float or bool,
same shape) is 1 on response tokens that count and 0 on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

__all__ = [
    "PPOLossOutput",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss",
]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is non-zero.

    ``sum(values * mask) / sum(mask)``, over all elements when ``dim`` is None, else along ``dim``.
    An all-zero mask gives NaN (0 / 0), as in TRL.
    """
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked positions (a 0-dim tensor).

    ``mu = masked_mean(x, m)``, ``var = masked_mean((x - mu)**2, m)``; with ``unbiased`` the
    Bessel correction ``n / (n - 1)`` is applied, ``n = sum(m)``.

    Raises ``ValueError`` when ``n == 0`` and, with ``unbiased``, when ``n == 1`` (the correction
    would divide by zero; TRL raises too - use larger minibatches).
    """
    n = float(mask.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element (mask.sum() == 0)")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if n == 1:
            raise ValueError(
                "masked_var: unbiased variance of a single element (mask.sum() == 1) divides by "
                "zero; use a larger (mini)batch or unbiased=False"
            )
        # Python float: an integer/bool mask would otherwise give a float32 factor.
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``values`` with masked statistics.

    ``(x - mu) / sqrt(var + 1e-8)`` with ``mu = masked_mean``, ``var = masked_var`` (unbiased).
    With ``shift_mean=False`` the mean is added back: ``(x - mu) / sqrt(var + 1e-8) + mu``
    (only the scale changes). Unmasked positions are transformed too; callers mask them out.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in fp32: ``H = logsumexp(z) - sum_v p_v z_v``.

    Terms with ``p_v == 0`` contribute 0 (so ``-inf`` logits of masked-out vocab entries give a
    finite entropy instead of ``0 * -inf = nan``); for finite logits this equals TRL exactly.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    pz = torch.where(p > 0, p * z, torch.zeros_like(z))
    return torch.logsumexp(z, dim=-1) - pz.sum(-1)


@dataclass
class PPOLossOutput:
    """Result of :func:`ppo_loss`.

    ``loss`` = ``policy_loss + vf_coef * value_loss`` (differentiable); ``value_loss`` is the raw
    ``0.5 * ...`` loss, *not* scaled by ``vf_coef``. ``skipped`` is True when the mean ratio was
    above ``ratio_threshold`` (all three losses are then multiplied by 0). ``stats`` maps metric
    names (logged as ``ppo/<key>``) to detached 0-dim tensors.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    skipped: bool = False
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of the same [B, R] shape, got {shapes}")


def _stat_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased masked variance for logging; 0 when fewer than two tokens (never raises)."""
    if mask.sum() > 1:
        return masked_var(values, mask, unbiased=True)
    return torch.zeros((), dtype=values.dtype, device=values.device)


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    vpreds: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    ratio_threshold: float = float("inf"),
    entropy: Optional[torch.Tensor] = None,
) -> PPOLossOutput:
    """Clipped PPO policy + value loss for one minibatch (TRL ``PPOTrainer.loss``).

    Inputs, all ``[B, R]``: ``logprobs`` (current policy, with grad), ``old_logprobs`` (rollout
    policy), ``values`` (rollout value estimates), ``vpreds`` (current value head, with grad),
    ``advantages``, ``returns``, ``mask``; ``entropy`` optional per-token entropy (stat only).
    ``m[.]`` below is :func:`masked_mean` under ``mask``.

    Value loss (clipped around the rollout values)::

        V_clip   = clamp(vpreds, values - cliprange_value, values + cliprange_value)
        vf_loss  = 0.5 * m[max((vpreds - returns)^2, (V_clip - returns)^2)]
        vf_clipfrac = m[(V_clip - returns)^2 > (vpreds - returns)^2]

    Policy loss (Schulman et al. 2017 eq. 7, negated for minimisation)::

        ratio    = exp(logprobs - old_logprobs)
        pg_loss  = m[max(-A * ratio, -A * clamp(ratio, 1 - cliprange, 1 + cliprange))]
        pg_clipfrac = m[-A * clamp(ratio, ...) > -A * ratio]

    ``loss = pg_loss + vf_coef * vf_loss``. If ``m[ratio] > ratio_threshold`` the batch is
    skipped: ``pg_loss``, ``vf_loss`` and ``loss`` are multiplied by 0 (the graph is kept so a
    backward pass still works and yields zero gradients) and ``skipped`` is True.

    Stats: ``approxkl = 0.5 * m[(logprobs - old_logprobs)^2]``,
    ``policykl = m[old_logprobs - logprobs]``, plus masked means / variances of advantages,
    ratio, returns, vpreds, values (see ``stats`` keys). The logged ``loss/value`` is the raw
    ``vf_loss`` (as TRL logs it). Variances fall back to 0 on a single-token minibatch.

    Raises ``ValueError`` on mismatched shapes or an all-zero ``mask`` (TRL fails there too).
    """
    named = {
        "logprobs": logprobs,
        "old_logprobs": old_logprobs,
        "values": values,
        "vpreds": vpreds,
        "advantages": advantages,
        "returns": returns,
        "mask": mask,
    }
    if entropy is not None:
        named["entropy"] = entropy
    _check_same_shape(**named)
    if mask.sum() == 0:
        raise ValueError("ppo_loss: the mask selects no response token (mask.sum() == 0)")

    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)

    loss = pg_loss + vf_coef * vf_loss

    avg_ratio = masked_mean(ratio, mask).detach()
    # Skip the .item() host sync when the check can never fire (the default).
    skipped = not (math.isinf(ratio_threshold) and ratio_threshold > 0) and (
        avg_ratio.item() > ratio_threshold
    )
    if skipped:
        # Multiply rather than replace so the graph (and a zero gradient) survives.
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0

    with torch.no_grad():
        stats: Dict[str, torch.Tensor] = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "loss/total": loss.detach(),
        }
        if entropy is not None:
            stats["policy/entropy"] = masked_mean(entropy.detach(), mask)
        stats.update(
            {
                "policy/approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
                "policy/policykl": masked_mean(-log_ratio.detach(), mask),
                "policy/clipfrac": pg_clipfrac,
                "policy/advantages_mean": masked_mean(advantages.detach(), mask),
                "policy/ratio": avg_ratio,
                "returns/mean": masked_mean(returns.detach(), mask),
                "returns/var": _stat_var(returns.detach(), mask),
                "val/vpred": masked_mean(vpreds.detach(), mask),
                "val/error": masked_mean(vf_losses1.detach(), mask),
                "val/clipfrac": vf_clipfrac,
                "val/mean": masked_mean(values.detach(), mask),
                "val/var": _stat_var(values.detach(), mask),
            }
        )
    return PPOLossOutput(
        loss=loss, policy_loss=pg_loss, value_loss=vf_loss, skipped=bool(skipped), stats=stats
    )
