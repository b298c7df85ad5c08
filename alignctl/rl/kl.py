"""KL penalties between the policy and the reference model, and KL-coefficient controllers.

Matches the classic TRL ``PPOTrainer`` (trl 0.4 - 0.11: ``_kl_penalty``, ``AdaptiveKLController``,
``FixedKLController``); ``k3`` is the estimator of TRL's newer PPO/RLOO trainers.

- The per-token KL penalty in the reward and the adaptive KL controller are from Ziegler et al.
  2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2.
- ``k3`` is Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html):
  unbiased, non-negative, lower variance than ``k1``.
"""

from __future__ import annotations

from typing import Dict, Union

import torch
import torch.nn.functional as F

__all__ = [
    "KL_PENALTIES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "build_kl_controller",
    "full_kl",
    "kl_penalty",
]

KL_PENALTIES = ("kl", "k1", "abs", "mse", "k3", "full")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL penalty estimate from the log-probs of the *sampled* tokens.

    With ``d = logprobs - ref_logprobs`` (policy minus reference):

    - ``kl`` / ``k1``: ``d`` (unbiased estimator of KL(pi || ref), can be negative per token)
    - ``abs``:         ``|d|``
    - ``mse``:         ``0.5 * d**2``
    - ``k3``:          ``(exp(r) - 1) - r`` with ``r = -d = ref_logprobs - logprobs``

    ``full`` needs the whole distributions: use :func:`full_kl` on the logits instead.
    """
    if kind == "full":
        raise ValueError(
            "kl_penalty kind 'full' needs the full vocabulary distributions: "
            "compute it with full_kl(logits, ref_logits) and pass it as a precomputed kl"
        )
    if kind not in KL_PENALTIES:
        raise ValueError(f"Unknown kl penalty {kind!r}; valid kinds: {', '.join(KL_PENALTIES)}")
    d = logprobs - ref_logprobs
    if kind in ("kl", "k1"):
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    r = ref_logprobs - logprobs  # k3
    return (torch.exp(r) - 1) - r


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact per-position ``KL(p || p_ref) = sum_v p_v (log p_v - log p_ref_v)`` from ``[..., V]`` logits.

    ``log p = log_softmax(logits / temperature)`` in fp32 (same for the reference). Equals
    ``F.kl_div(ref_logp, logp, log_target=True, reduction="none").sum(-1)`` (TRL's ``full``
    penalty); vocab entries with ``p_v == 0`` contribute 0 instead of NaN.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"full_kl: logits {tuple(logits.shape)} vs ref_logits {tuple(ref_logits.shape)}")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ref_logp = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p))
    return terms.sum(-1)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, eq. 2).

    After each step with observed KL ``current`` over ``n_steps`` samples::

        e     = clip(current / target - 1, -0.2, 0.2)
        value = value * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target is None or target <= 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target!r}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: Union[float, torch.Tensor], n_steps: int) -> None:
        proportional_error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: Union[float, torch.Tensor], n_steps: int) -> None:
        pass

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = Union[AdaptiveKLController, FixedKLController]


def build_kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: float) -> KLController:
    """Adaptive controller when ``adaptive`` (TRL ``adap_kl_ctrl``), else a fixed one at ``init_kl_coef``."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
