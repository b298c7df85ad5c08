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

Critic-free, sequence-level advantages (one scalar per completion) for the group-sampling methods
are at the end of the module: :func:`group_advantages` (GRPO, TRL ``GRPOTrainer``),
:func:`rloo_advantages` and :func:`normalize_scores` (RLOO, TRL ``RLOOTrainer`` 0.11 - 0.14).
Their losses are in :mod:`alignctl.losses.grpo`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from alignctl.losses.dpo import RunningMoments
from alignctl.losses.ppo import masked_whiten
from alignctl.rl.kl import kl_penalty

__all__ = [
    "GROUP_SCALES",
    "gae_advantages",
    "group_advantages",
    "normalize_scores",
    "per_token_rewards",
    "rloo_advantages",
    "scale_scores",
]


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


# --------------------------------------------------------------------------- GRPO / RLOO
#
# Sequence-level, critic-free advantages: one scalar per completion, computed from several
# completions sampled for the same prompt. Layout convention for both functions: the N = P * G
# rows of a batch hold P prompts with G completions each, the rows of one prompt CONTIGUOUS
# (row ``p * G + j`` is completion ``j`` of prompt ``p``), which is the order TRL's GRPOTrainer
# uses (``RepeatSampler`` repeats each prompt ``num_generations`` times in a row).

GROUP_SCALES = ("group", "batch", "none")


def _as_float_vector(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    if x.dim() != 1:
        x = x.reshape(-1)
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor")
    return x


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-relative advantages of GRPO (TRL ``GRPOTrainer._generate_and_score_completions``).

    ``rewards`` ``[N]`` (the summed, weighted reward of each completion), ``N = P * G`` with
    ``G = group_size`` and rows of one prompt contiguous (row ``p * G + j``). Writing
    ``r_{p,j}`` for the reward of completion ``j`` of prompt ``p``::

        mu_p     = (1 / G) * sum_j r_{p,j}
        sigma_p  = sqrt( sum_j (r_{p,j} - mu_p)^2 / (G - 1) )          (Bessel, torch.std)
        sigma_B  = sqrt( sum_{p,j} (r_{p,j} - mean(r))^2 / (N - 1) )    (whole batch)

        std_{p,j} = sigma_p   for scale in {"group", "none"}
                    sigma_B   for scale == "batch"
        A_{p,j}   = r_{p,j} - mu_p                                      (always the group mean)
        A_{p,j}   = A_{p,j} / (std_{p,j} + eps)                         unless scale == "none"
        zero_std  = isclose(std_{p,j}, 0)

    - ``"group"``: the outcome-supervision advantage of GRPO, Shao et al. 2024, "DeepSeekMath:
      Pushing the Limits of Mathematical Reasoning in Open Language Models", sec. 4.1.2
      (``A_i = (r_i - mean(r)) / std(r)``); ``eps = 1e-4`` is TRL's constant.
    - ``"none"``: no std division, Liu et al. 2025, "Understanding R1-Zero-Like Training: A
      Critical Perspective" (Dr. GRPO): dividing by the group std up-weights prompts that are
      too easy or too hard (question-level difficulty bias).
    - ``"batch"``: group mean with the std of the whole batch (TRL ``scale_rewards="batch"``; the
      "group mean, batch std" normalisation of Liu et al. 2025, "Part I: Tricks or Traps? A Deep
      Dive into RL for LLM Reasoning").

    A group whose rewards are all equal gets advantage 0 (``sigma_p = 0``, hence ``eps``) and
    ``zero_std`` True: it carries no learning signal (DAPO's dynamic sampling, Yu et al. 2025,
    drops such groups); ``zero_std.float().mean()`` is TRL's ``frac_reward_zero_std`` and
    ``std.mean()`` its ``reward_std``. As in TRL both are taken on the std of the chosen scale,
    so with ``"batch"`` they describe the batch std, not the group stds.

    Returns ``(advantages [N], std [N], zero_std [N] bool)``; ``advantages`` has the dtype of
    ``rewards`` (integers are promoted to float32). Raises ``ValueError`` when ``group_size < 2``
    (a one-sample std is undefined; TRL requires ``num_generations >= 2``), when ``N`` is not a
    multiple of ``group_size``, or on an unknown ``scale``.
    """
    if int(group_size) != group_size or group_size < 2:
        raise ValueError(f"num_generations must be >= 2, got group_size={group_size!r}")
    group_size = int(group_size)
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(GROUP_SCALES)}")
    rewards = _as_float_vector(rewards, "group_advantages")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"group_advantages: {n} rewards is not a multiple of group_size={group_size}"
        )

    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = rewards.std().expand_as(rewards).clone()
    else:
        std = grouped.std(dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + eps)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return advantages, std, zero_std


def rloo_advantages(
    scores: torch.Tensor,
    kl_sum: torch.Tensor,
    k: int,
    kl_coef: float,
    normalize_advantage: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE Leave-One-Out advantages (TRL ``RLOOTrainer``, the PPOv2-style 0.11 - 0.14).

    ``scores`` ``[N]`` are the (optionally :func:`normalize_scores`-ed) reward-model scores,
    ``kl_sum`` ``[N]`` the per-sequence sum of the per-token ``k1`` KL estimate
    ``logprobs - ref_logprobs`` over the response tokens. ``N = P * k`` with the ``k`` samples
    of one prompt contiguous (row ``p * k + i``)::

        R_{p,i}   = score_{p,i} - kl_coef * kl_sum_{p,i}                 (rlhf_reward)
        b_{p,i}   = (1 / (k - 1)) * sum_{j != i} R_{p,j}                 (leave-one-out baseline)
                  = (sum_j R_{p,j} - R_{p,i}) / (k - 1)
        A_{p,i}   = R_{p,i} - b_{p,i}
        A         = (A - mean(A)) / (std(A) + 1e-8)        if normalize_advantage (whole batch,
                                                            unbiased std)

    The baseline is the leave-one-out estimator of Kool et al. 2019, "Buy 4 REINFORCE Samples,
    Get a Baseline for Free!"; its use for RLHF is RLOO, Ahmadian et al. 2024, "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs", sec. 3
    (``1/k sum_i [R(y_i) - 1/(k-1) sum_{j != i} R(y_j)] grad log pi(y_i | x)``). The baseline
    does not depend on sample ``i`` itself, so the estimator stays unbiased.

    Layout note: TRL's RLOO trainer repeats the whole prompt batch ``k`` times
    (``queries.repeat(rloo_k, 1)``), i.e. its rows are ``i * P + p`` and it reshapes to
    ``[k, P]``; here the rows are ``p * k + i`` (``[P, k]``), the GRPO order. The values per
    (prompt, sample) are identical; only the row order differs.

    Returns ``(advantages [N], rlhf_reward [N])``. Raises ``ValueError`` when ``k < 2``, when the
    shapes differ or when ``N`` is not a multiple of ``k``.
    """
    if int(k) != k or k < 2:
        raise ValueError(
            f"rloo_advantages: k must be >= 2 (leave-one-out needs another sample), got {k!r}"
        )
    k = int(k)
    scores = _as_float_vector(scores, "rloo_advantages")
    kl_sum = torch.as_tensor(kl_sum, device=scores.device)
    if kl_sum.numel() != scores.numel():
        raise ValueError(
            f"rloo_advantages: {scores.numel()} scores but {kl_sum.numel()} kl_sum values"
        )
    kl_sum = kl_sum.reshape(-1).to(scores.dtype)
    n = scores.numel()
    if n % k != 0:
        raise ValueError(f"rloo_advantages: {n} scores is not a multiple of k={k}")

    rlhf_reward = scores - kl_coef * kl_sum
    grouped = rlhf_reward.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages, rlhf_reward


def normalize_scores(scores: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Standardise and clip reward-model scores over the batch (TRL RLOO ``normalize_reward``).

    ::

        s = (scores - mean(scores)) / (std(scores) + 1e-8)     (unbiased std, whole batch)
        s = clamp(s, -clip_range, clip_range)                  (TRL ``reward_clip_range``)

    Applied before the KL penalty and the leave-one-out baseline (:func:`rloo_advantages`).
    Returns a new tensor (``scores`` is not modified). Raises ``ValueError`` for fewer than two
    scores (the unbiased std is undefined; TRL would silently produce NaN) or a negative
    ``clip_range``.
    """
    scores = _as_float_vector(scores, "normalize_scores")
    if scores.numel() < 2:
        raise ValueError("normalize_scores: need at least two scores for a standard deviation")
    if clip_range < 0:
        raise ValueError(f"normalize_scores: clip_range must be >= 0, got {clip_range}")
    scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    return torch.clamp(scores, -clip_range, clip_range)
