"""DDPO math (pure tensor / numpy functions, no models, no I/O).

Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (DDPO_IS, the clipped
importance-sampling variant), as the reference library's ``DDPOTrainer`` computes it (itself from
kvablack/ddpo-pytorch):

- :func:`ddim_step_with_logprob`: one DDIM step (Song et al. 2021) with ``eta > 0`` seen as a
  Gaussian policy over the next latents, and the log-density of given next latents under it;
- :func:`PerPromptStatTracker` / :func:`whiten_rewards`: advantages from rewards;
- :func:`ddpo_loss`: the clipped surrogate with advantage clipping, approx KL and clip fraction.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch


def _left_broadcast(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` of shape ``[B]`` (or scalar) viewed as ``[B, 1, 1, ...]`` and expanded to ``shape``."""
    t = torch.as_tensor(t)
    return t.reshape(list(t.shape) + [1] * (len(shape) - t.ndim)).expand(shape)


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor  # x_{t-1}: the given one, or mean + std * noise when sampled
    log_prob: torch.Tensor  # [B]: log N(x_{t-1}; mean, std^2), averaged over the latent elements
    prev_sample_mean: torch.Tensor  # mu_theta(x_t, t)
    std_dev_t: torch.Tensor  # sigma_t, broadcast to the sample's shape


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    timestep: Union[int, torch.Tensor],
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
    num_inference_steps: int,
    eta: float = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    prediction_type: str = "epsilon",
) -> DDIMStep:
    """One DDIM step x_t -> x_{t-1} with its Gaussian log-probability (epsilon, v or sample
    prediction; ``timestep`` a scalar or one per sample). With ``a_t = alphas_cumprod[t]``,
    ``t' = clamp(t - T/n, 0, T-1)`` (T = num_train_timesteps, n = num_inference_steps; the
    reference clamps, so the last step uses ``alphas_cumprod[0]``), ``a' = alphas_cumprod[t']``::

        x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)        (clamped to +-range if clip_sample)
        var_t   = (1 - a') / (1 - a_t) * (1 - a_t / a')
        sigma_t = eta * sqrt(var_t)
        mu      = sqrt(a') * x0_hat + sqrt(1 - a' - sigma_t^2) * eps
        x_{t-1} = mu + sigma_t * z,  z ~ N(0, I)                  (unless prev_sample is given)
        log p   = mean over latent elements of
                  [ -(x_{t-1} - mu)^2 / (2 sigma_t^2) - log sigma_t - log sqrt(2 pi) ]

    (``eps`` is recomputed from the clipped x0_hat when use_clipped_model_output.) The given
    ``prev_sample`` is detached: gradients flow through ``mu`` only, as in the reference.
    ``eta`` must be > 0 (with 0 the step is deterministic and has no density).
    """
    if eta <= 0:
        raise ValueError("ddim_step_with_logprob needs eta > 0 (a deterministic step has no log-probability)")
    device = sample.device
    timestep = torch.as_tensor(timestep, device=device).long()
    alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
    prev_timestep = (timestep - num_train_timesteps // num_inference_steps).clamp(0, num_train_timesteps - 1)
    shape = sample.shape
    alpha_prod_t = _left_broadcast(alphas_cumprod.gather(0, timestep.reshape(-1)).reshape(timestep.shape), shape)
    alpha_prod_t_prev = _left_broadcast(
        alphas_cumprod.gather(0, prev_timestep.reshape(-1)).reshape(prev_timestep.shape), shape
    )
    alpha_prod_t, alpha_prod_t_prev = alpha_prod_t.to(sample.dtype), alpha_prod_t_prev.to(sample.dtype)
    beta_prod_t = 1 - alpha_prod_t

    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    else:
        raise ValueError(f"prediction_type={prediction_type!r}: use epsilon, sample or v_prediction")
    if clip_sample:
        pred_original_sample = pred_original_sample.clamp(-clip_sample_range, clip_sample_range)

    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.sqrt()
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction

    if prev_sample is None:
        noise = torch.randn(shape, generator=generator, device=device, dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
        - torch.log(std_dev_t)
        - math.log(math.sqrt(2 * math.pi))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return DDIMStep(prev_sample.type(sample.dtype), log_prob, prev_sample_mean, std_dev_t)


@dataclass
class DDPOLossOutput:
    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> DDPOLossOutput:
    """Clipped surrogate of DDPO_IS for one denoising step of a batch (all ``[B]``)::

        A      = clamp(A, -adv_clip_max, adv_clip_max)
        r      = exp(log p_theta - log p_old)
        loss   = mean( max(-A * r, -A * clamp(r, 1 - clip_range, 1 + clip_range)) )
        approx_kl = 0.5 * mean( (log p_theta - log p_old)^2 )
        clipfrac  = mean( |r - 1| > clip_range )
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * (diff.detach() ** 2).mean()
    clipfrac = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return DDPOLossOutput(loss, approx_kl, clipfrac)


def whiten_rewards(rewards: np.ndarray) -> np.ndarray:
    """Batch advantages without per-prompt tracking: (r - mean(r)) / (std(r) + 1e-8), population std."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


class PerPromptStatTracker:
    """Per-prompt reward statistics (the reference's ``PerPromptStatTracker``).

    Each prompt keeps a buffer of its last ``buffer_size`` rewards (this batch's appended first).
    A reward's advantage is ``(r - mean) / (std + 1e-6)`` (population std) with the mean and std of
    its prompt's buffer once that holds at least ``min_count`` rewards, and of the whole current
    batch before.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: Dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[float]) -> np.ndarray:
        prompts = np.array(prompts, dtype=object)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts.tolist()):  # first-seen order (np.unique sorts; same result)
            where = prompts == prompt
            prompt_rewards = rewards[where]
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(prompt_rewards.tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[where] = (prompt_rewards - mean) / std
        return advantages

    def get_stats(self) -> Dict[str, Dict[str, float]]:
        return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "count": len(v)} for k, v in self.stats.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.get("stats", {}).items()}


def shuffled_timesteps(batch: int, num_steps: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, T]``: an independent permutation of the denoising steps for each sample (the
    reference trains on every sample's steps in its own random order)."""
    return torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(batch)])


def num_train_timesteps(sample_num_steps: int, timestep_fraction: float) -> int:
    """Denoising steps trained per sample: int(sample_num_steps * train_timestep_fraction)."""
    return int(sample_num_steps * timestep_fraction)
