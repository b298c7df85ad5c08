"""DDIM sampling that records the trajectory: for every denoising step the latents, the next
latents, the timestep and the step's log-probability (``losses.ddpo.ddim_step_with_logprob``),
with classifier-free guidance against negative-prompt embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from alignctl.losses.ddpo import ddim_step_with_logprob


@dataclass
class Trajectory:
    latents: torch.Tensor  # [N, T, C, h, w]: x_t before each step
    next_latents: torch.Tensor  # [N, T, C, h, w]: x_{t-1} after it
    log_probs: torch.Tensor  # [N, T]
    timesteps: torch.Tensor  # [N, T]
    final_latents: torch.Tensor  # [N, C, h, w]


def guided(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch: eps_u + w * (eps_c - eps_u)."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def step_settings(scheduler):
    """Arguments of ``ddim_step_with_logprob`` taken from a diffusers DDIM scheduler."""
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        raise ValueError("DDIM thresholding is not supported by DDPO's step log-probability")
    return dict(
        alphas_cumprod=scheduler.alphas_cumprod, num_train_timesteps=cfg.num_train_timesteps,
        clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type,
    )


@torch.no_grad()
def sample_with_logprob(
    policy,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    latent_size: int,
    generator: Optional[torch.Generator] = None,
) -> Trajectory:
    """Sample ``len(prompt_embeds)`` latents with ``num_steps`` DDIM steps (eta > 0)."""
    scheduler = policy.pipeline.scheduler
    scheduler.set_timesteps(num_steps, device=prompt_embeds.device)
    settings = step_settings(scheduler)
    n = prompt_embeds.shape[0]
    channels = policy.unet.config.in_channels
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    latents = torch.randn((n, channels, latent_size, latent_size), generator=generator, device="cpu").to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    cfg = guidance_scale > 1.0
    embeds = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
    all_latents, all_next, all_logp = [], [], []
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise_pred = policy(model_in, t.expand(model_in.shape[0]), embeds)
        if cfg:
            noise_pred = guided(noise_pred, guidance_scale)
        noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device, dtype)
        step = ddim_step_with_logprob(noise_pred.float(), t.expand(n), latents.float(), num_inference_steps=num_steps,
                                      eta=eta, **settings)
        # the sample itself: mean + std * noise, drawn from the explicit generator
        next_latents = (step.prev_sample_mean + step.std_dev_t * noise.float()).to(dtype)
        log_prob = ddim_step_with_logprob(noise_pred.float(), t.expand(n), latents.float(), num_inference_steps=num_steps,
                                          eta=eta, prev_sample=next_latents.float(), **settings).log_prob
        all_latents.append(latents)
        all_next.append(next_latents)
        all_logp.append(log_prob)
        latents = next_latents
    return Trajectory(
        latents=torch.stack(all_latents, dim=1), next_latents=torch.stack(all_next, dim=1),
        log_probs=torch.stack(all_logp, dim=1), timesteps=scheduler.timesteps.to(device).repeat(n, 1),
        final_latents=latents,
    )
