"""Per-token rewards, GAE advantages and score scaling for PPO (pure tensor math, no models).

Matches the classic TRL ``PPOTrainer`` (trl 0.4 - 0.11: ``compute_rewards``,
``compute_advantages`` and the score scaling / clipping at the top of ``step``).

- Per-token reward = ``-kl_coef * KL`` on every response token plus the reward-model score on the
  last one: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2.
- Generalized Advantage Estimation: Schulman et al. 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", eq. 16.
- Used by the clipped PPO loss (Schulman et al. 2017), see :mod:`alignctl.losses.ppo`.

Per-token tensors have shape ``[B, R]`` (batch x response tokens) with a ``[B, R]`` mask that is
non-zero on real response tokens (left or right padding both work).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from alignctl.losses.dpo import RunningMoments
from alignctl.losses.ppo import masked_whiten
from alignctl.rl.kl import kl_penalty

__all__ = ["gae_advantages", "per_token_rewards", "scale_scores"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of the same [B, R] shape, got {shapes}")


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of the last non-zero mask position per row; ValueError on an empty row."""
    nonzero = mask != 0
    empty = ~nonzero.any(dim=-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"per_token_rewards: mask row(s) {rows} have no response token")
    # Positions are 1..R so the largest masked position is the unique maximum of the row.
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (nonzero.long() * positions).argmax(dim=-1)


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
    kl: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-token rewards from sequence scores and a KL penalty (TRL ``compute_rewards``).

    ::

        kl_t              = kl_penalty(logprobs_t, ref_logprobs_t, kind)   (or the given ``kl``)
        non_score_reward_t = -kl_coef * kl_t
        reward_t          = non_score_reward_t + score * [t == last t with mask_t != 0]

    ``scores`` has one value per row (``[B]``). ``kl`` is a precomputed per-token ``[B, R]``
    penalty, required for ``kind="full"`` (see :func:`alignctl.rl.kl.full_kl`). As in TRL the
    rewards are *not* multiplied by the mask here (:func:`gae_advantages` does that).

    Returns ``(rewards, non_score_rewards, kl)``, each ``[B, R]``. Raises ``ValueError`` when a
    mask row is all zero (no token to put the score on).
    """
    if kl is None:
        kl = kl_penalty(logprobs, ref_logprobs, kind)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask, kl=kl)
    scores = torch.as_tensor(scores, device=kl.device).reshape(-1)
    if scores.numel() != mask.shape[0]:
        raise ValueError(f"per_token_rewards: {scores.numel()} scores for {mask.shape[0]} rows")

    non_score_rewards = -kl_coef * kl
    last = _last_token_index(mask).unsqueeze(1)
    rewards = non_score_rewards.scatter_add(1, last, scores.to(non_score_rewards.dtype).unsqueeze(1))
    return rewards, non_score_rewards, kl


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and returns (TRL ``compute_advantages``; Schulman et al. 2016).

    With ``V = values * mask`` and ``r = rewards * mask`` (optionally
    ``r = masked_whiten(r, mask, shift_mean=False)`` when ``whiten_rewards``), backwards over t::

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_R = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}       (A_R = 0)
        returns = A + V
        A       = masked_whiten(A, mask)                (shift_mean=True), detached

    Returns ``(V, A_whitened, returns)``. Whitening is over the whole batch, so it needs at least
    two response tokens in total (``masked_var`` raises otherwise, as in TRL).
    """
    _check_same_shape(values=values, rewards=rewards, mask=mask)
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    gen_len = rewards.shape[-1]
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)

    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


def scale_scores(
    scores: torch.Tensor,
    running: RunningMoments,
    *,
    use_score_scaling: bool,
    use_score_norm: bool,
    score_clip: Optional[float],
) -> torch.Tensor:
    """Scale / normalise / clip reward-model scores as at the top of TRL ``PPOTrainer.step``.

    If ``use_score_scaling``: fold ``scores`` into ``running`` (updated in place), then with
    ``s = running.std + eps`` (``eps = finfo(scores.dtype).eps``)::

        scores = (scores - running.mean) / s   if use_score_norm
        scores = scores / s                    otherwise

    ``use_score_norm`` has an effect only together with ``use_score_scaling`` (TRL behaviour:
    on its own it is a no-op). Then, if ``score_clip`` is not None, clamp to
    ``[-score_clip, score_clip]`` (in fp32, cast back). Returns a new tensor; ``scores`` itself
    is never modified.
    """
    scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.float()
    scores = scores.clone()
    dtype, device = scores.dtype, scores.device
    if use_score_scaling:
        running.update(scores)
        factor = torch.as_tensor(running.std, dtype=dtype, device=device) + torch.finfo(dtype).eps
        if use_score_norm:
            scores = (scores - torch.as_tensor(running.mean, dtype=dtype, device=device)) / factor
        else:
            scores = scores / factor
    if score_clip is not None:
        scores = torch.clamp(scores.float(), -score_clip, score_clip).to(dtype)
    return scores
