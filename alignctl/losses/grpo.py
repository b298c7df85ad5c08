"""GRPO and RLOO policy losses (pure tensor math, no I/O, no models).

- GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", sec. 4.1 (eq. 3: clipped surrogate with group-relative advantages and a
  ``k3`` KL penalty to the reference model added to the loss, not the reward). Numerically
  matches TRL ``GRPOTrainer._compute_loss`` (trl 0.2x / 1.x, ``importance_sampling_level=
  "token"``, no ``delta``, no vLLM importance-sampling correction).
- ``loss_type`` variants: ``"grpo"`` (per-sequence length normalisation, the paper's
  ``1/|o_i|``), ``"bnpo"`` (token mean over the local batch), ``"dr_grpo"`` (Liu et al. 2025,
  "Understanding R1-Zero-Like Training: A Critical Perspective": a constant normaliser, no
  length bias) and ``"dapo"`` (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
  System at Scale": token-level loss over the whole global batch). Asymmetric clipping
  ``epsilon_low != epsilon_high`` is DAPO's "clip-higher".
- RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", with the leave-one-out baseline of Kool et al. 2019,
  "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; numerically matches the PPO-style update
  of TRL ``RLOOTrainer`` (trl 0.11 - 0.14), which clips a *sequence-level* ratio.

Advantages come from :func:`alignctl.rl.advantages.group_advantages` (GRPO) and
:func:`alignctl.rl.advantages.rloo_advantages` (RLOO). Per-token tensors are ``[B, T]``
(completions x completion tokens), ``mask`` (float or bool, same shape) is 1 on completion
tokens that count and 0 on padding; ``advantages`` is ``[B]`` (one scalar per completion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

__all__ = [
    "GRPO_LOSS_TYPES",
    "GRPOLossOutput",
    "RLOOLossOutput",
    "grpo_loss",
    "rloo_loss",
]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOLossOutput:
    """Result of :func:`grpo_loss`: the differentiable scalar ``loss`` and ``stats``, a map from
    metric names to detached 0-dim tensors."""

    loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RLOOLossOutput:
    """Result of :func:`rloo_loss`: the differentiable scalar ``loss`` and ``stats``, a map from
    metric names to detached 0-dim tensors."""

    loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


def _check_tokens(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    if mask.dim() != 2:
        raise ValueError(f"expected a [B, T] mask, got shape {tuple(mask.shape)}")
    shapes = {"mask": tuple(mask.shape)}
    shapes.update({name: tuple(t.shape) for name, t in tensors.items() if t is not None})
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected per-token tensors of the same [B, T] shape, got {shapes}")


def _sequence_advantages(advantages: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    advantages = torch.as_tensor(advantages, device=like.device)
    if advantages.numel() != batch:
        raise ValueError(
            f"expected one advantage per completion ([B] = [{batch}]), "
            f"got shape {tuple(advantages.shape)}"
        )
    return advantages.reshape(batch).to(like.dtype)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    max_completion_length: Optional[int] = None,
    num_items: Optional[Union[int, float, torch.Tensor]] = None,
    entropy: Optional[torch.Tensor] = None,
) -> GRPOLossOutput:
    """Clipped GRPO surrogate loss for one micro-batch (TRL ``GRPOTrainer._compute_loss``).

    Inputs: ``logprobs`` ``[B, T]`` (current policy, with grad), ``old_logprobs`` ``[B, T]``
    (the policy that generated the completions; ``None`` means "same as ``logprobs``", TRL's
    ``num_iterations == 1`` case: ratio 1, gradient of ``A * logprobs``), ``advantages`` ``[B]``,
    ``mask`` ``[B, T]``, ``ref_logprobs`` ``[B, T]`` (needed when ``beta != 0``), ``entropy``
    ``[B, T]`` optional per-token entropy (stat only). ``old_logprobs`` and ``ref_logprobs``
    are treated as constants (detached). Per token, with ``A`` broadcast over the tokens::

        r_t       = exp(logprobs_t - old_logprobs_t)                              (coef_1)
        r_t^clip  = clamp(r_t, 1 - epsilon_low, 1 + epsilon_high)                 (coef_2)
        l_t       = -min(r_t * A, r_t^clip * A)
        kl_t      = exp(ref_t - logprobs_t) - (ref_t - logprobs_t) - 1            (k3 >= 0)
        l_t       = l_t + beta * kl_t                                             if beta != 0

    Aggregation (``m`` = mask, ``B`` = rows of this micro-batch)::

        grpo:     mean_i [ sum_t l_{i,t} m_{i,t} / max(sum_t m_{i,t}, 1) ]
        bnpo:     sum_{i,t} l m / max(sum_{i,t} m, 1)
        dr_grpo:  sum_{i,t} l m / (B * max_completion_length)
        dapo:     sum_{i,t} l m / num_items

    ``num_items`` (``"dapo"``) is the number of completion tokens of the whole *global* batch of
    one optimizer step (all micro-batches of the gradient accumulation and, in TRL, all
    processes); ``None`` falls back to ``max(sum(mask), 1)`` (then ``"dapo"`` equals
    ``"bnpo"``). TRL divides ``num_items_in_batch`` by ``num_processes`` because DDP averages
    gradients over processes: pass ``num_items / world_size`` under DDP to reproduce it. As in
    TRL, ``grpo`` / ``bnpo`` / ``dr_grpo`` are per micro-batch and the caller divides them by the
    number of gradient-accumulation steps; ``dapo`` is already normalised globally (do not divide).

    Stats (detached 0-dim tensors; ``M[x] = sum(x * m) / max(sum(m), 1)`` over all tokens of the
    micro-batch, TRL's ``masked_batch_mean``)::

        "kl"                    M[kl_t]                                  (only if beta != 0)
        "clip_ratio/low_mean"   M[(r_t < 1 - epsilon_low) & (A < 0)]
        "clip_ratio/high_mean"  M[(r_t > 1 + epsilon_high) & (A > 0)]
        "clip_ratio/region_mean" M[low | high]
        "entropy"               M[entropy_t]                             (only if given)

    A token counts as clipped exactly when the clamped term wins the ``min`` and its gradient is
    zero; for ``r_t > 1 + epsilon_high`` with ``A < 0`` (or ``r_t < 1 - epsilon_low`` with
    ``A > 0``) the ``min`` keeps the unclipped ``r_t * A``, so such tokens are not counted.

    Raises ``ValueError`` on an unknown ``loss_type``, mismatched shapes, ``beta != 0`` without
    ``ref_logprobs``, ``"dr_grpo"`` without a positive ``max_completion_length`` or a
    non-positive Python-number ``num_items`` (a tensor is not checked, to avoid a device sync).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}"
        )
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs (the k3 KL to the reference)")
    _check_tokens(
        mask,
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs if beta != 0.0 else None,
        entropy=entropy,
    )
    batch = logprobs.shape[0]
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError("grpo_loss: loss_type='dr_grpo' needs a positive max_completion_length")

    mask = mask.to(logprobs.dtype)
    adv = _sequence_advantages(advantages, batch, logprobs).unsqueeze(1)  # [B, 1]
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()

    coef_1 = torch.exp(logprobs - old)
    coef_2 = torch.clamp(coef_1, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = None
    if beta != 0.0:
        ref = ref_logprobs.detach()
        per_token_kl = torch.exp(ref - logprobs) - (ref - logprobs) - 1.0
        per_token_loss = per_token_loss + beta * per_token_kl

    masked_sum = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_sum / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked_sum / (batch * max_completion_length)
    else:  # dapo
        if num_items is None:
            normalizer = mask.sum().clamp(min=1.0)
        else:
            if not isinstance(num_items, torch.Tensor) and num_items <= 0:
                raise ValueError(f"grpo_loss: num_items must be > 0, got {num_items}")
            normalizer = torch.as_tensor(num_items, dtype=logprobs.dtype, device=logprobs.device)
        loss = masked_sum / normalizer

    with torch.no_grad():
        token_count = mask.sum().clamp(min=1.0)

        def masked_batch_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.detach().to(mask.dtype) * mask).sum() / token_count

        stats: Dict[str, torch.Tensor] = {}
        if per_token_kl is not None:
            stats["kl"] = masked_batch_mean(per_token_kl)
        if entropy is not None:
            stats["entropy"] = masked_batch_mean(entropy)
        is_low = (coef_1 < 1.0 - epsilon_low) & (adv < 0)
        is_high = (coef_1 > 1.0 + epsilon_high) & (adv > 0)
        stats["clip_ratio/low_mean"] = masked_batch_mean(is_low)
        stats["clip_ratio/high_mean"] = masked_batch_mean(is_high)
        stats["clip_ratio/region_mean"] = masked_batch_mean(is_low | is_high)
    return GRPOLossOutput(loss=loss, stats=stats)


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
) -> RLOOLossOutput:
    """PPO-clipped RLOO loss on sequence-level ratios (TRL ``RLOOTrainer`` 0.11 - 0.14 update).

    ``logprobs`` ``[B, T]`` (current policy, with grad), ``old_logprobs`` ``[B, T]`` (rollout
    policy, detached), ``advantages`` ``[B]`` (:func:`alignctl.rl.advantages.rloo_advantages`),
    ``mask`` ``[B, T]``. The whole completion is one action::

        logp_i     = sum_t logprobs_{i,t} m_{i,t}            (new)
        logp_i^old = sum_t old_logprobs_{i,t} m_{i,t}        (old)
        rho_i      = exp(logp_i - logp_i^old)
        pg1_i      = -A_i * rho_i
        pg2_i      = -A_i * clamp(rho_i, 1 - cliprange, 1 + cliprange)
        loss       = mean_i max(pg1_i, pg2_i)

    (TRL fills padding log-probs with ``INVALID_LOGPROB = 1.0`` in both tensors instead of
    masking; the padding then cancels in ``logp - logp^old``, so the ratio is the same.) With
    ``old == new`` this is ``-mean_i A_i`` in value and its gradient is the RLOO estimator of
    Ahmadian et al. 2024 (REINFORCE with the leave-one-out baseline of Kool et al. 2019).

    Stats (detached 0-dim tensors, means over the ``B`` sequences)::

        "loss/policy"     loss
        "policy/clipfrac" mean_i [pg2_i > pg1_i]
        "policy/approxkl" 0.5 * mean_i (logp_i - logp_i^old)^2
        "policy/ratio"    mean_i rho_i           (the SEQUENCE-level ratio; TRL logs the mean of
                                                  the per-token ratios over all positions)

    Raises ``ValueError`` on mismatched shapes.
    """
    _check_tokens(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    batch = logprobs.shape[0]
    mask = mask.to(logprobs.dtype)
    adv = _sequence_advantages(advantages, batch, logprobs)

    new_seq = (logprobs * mask).sum(1)
    old_seq = (old_logprobs.detach() * mask).sum(1)
    logprobs_diff = new_seq - old_seq
    ratio = torch.exp(logprobs_diff)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(pg_losses, pg_losses2).mean()

    with torch.no_grad():
        stats = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": (pg_losses2 > pg_losses).float().mean(),
            "policy/approxkl": 0.5 * (logprobs_diff.detach() ** 2).mean(),
            "policy/ratio": ratio.detach().mean(),
        }
    return RLOOLossOutput(loss=loss, stats=stats)
