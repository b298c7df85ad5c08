"""Text-to-image pipelines for DDPO: a tiny Stable-Diffusion-style pipeline built in-process with
random weights (no download), or a diffusers pipeline folder / hub id.

The policy module (``DiffusionPolicy``) holds the UNet (trained, in full or through LoRA on its
attention projections) and the frozen text encoder and VAE; the scheduler and tokenizer ride
along as plain attributes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import torch

from alignctl.errors import ConfigError

TINY_SD = "tiny-sd"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _tiny_clip_tokenizer():
    """A CLIPTokenizer over single characters (no merges): every printable ASCII character, alone
    and word-final, plus CLIP's specials. Written to a temp folder and loaded (no download)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=32,
                            pad_token="<|endoftext|>")
    return tok


def build_tiny_pipeline(seed: int = 0):
    """UNet2DConditionModel + AutoencoderKL + CLIPTextModel, small and random (seeded), a DDIM
    scheduler with SD 1.x's schedule, and a character-level CLIP tokenizer. 32 x 32 px images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
    finally:
        torch.random.set_rng_state(state)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(name_or_path: str, revision: Optional[str] = None, seed: int = 0):
    """The tiny pipeline, or a diffusers StableDiffusionPipeline (folder or hub id; offline, a
    missing id is a clear error). The scheduler is replaced by DDIM with the same config."""
    if name_or_path == TINY_SD:
        return build_tiny_pipeline(seed)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, revision=revision, safety_checker=None, requires_safety_checker=False,
            local_files_only=offline or Path(name_or_path).is_dir(),
        )
    except (OSError, ValueError) as exc:
        hint = " (offline: set model.name_or_path to a local diffusers pipeline folder)" if offline else ""
        raise ConfigError(f"cannot load the diffusion pipeline {name_or_path!r}{hint}: {str(exc)[:200]}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


class DiffusionPolicy(torch.nn.Module):
    """The trained UNet beside the frozen text encoder and VAE (one module for accelerate)."""

    def __init__(self, pipeline, lora: Optional[dict] = None) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.vae = pipeline.unet, pipeline.text_encoder, pipeline.vae
        self.pipeline_ref = [pipeline]  # a list: not a submodule
        self.text_encoder.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(
                r=lora["r"], lora_alpha=lora["alpha"], init_lora_weights="gaussian", target_modules=lora["targets"],
            ))
        self.text_encoder.eval()
        self.vae.eval()

    @property
    def pipeline(self):
        return self.pipeline_ref[0]

    def forward(self, latents, timesteps, embeds):
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> torch.Tensor:
        tok = self.pipeline.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], ``[N, 3, H, W]`` float."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1).float()


class PipelineSaver:
    """What the run shell saves as the model: a diffusers pipeline folder (full UNet training), or
    the LoRA weights (``pytorch_lora_weights.safetensors``, for ``pipe.load_lora_weights``) beside
    the base pipeline when the base is the built-in tiny one (random weights cannot be re-downloaded)."""

    def __init__(self, policy: DiffusionPolicy, name_or_path: str, seed: int) -> None:
        self.policy, self.name_or_path, self.seed = policy, name_or_path, seed

    def save_pretrained(self, folder, safe_serialization: bool = True, state_dict=None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.policy.lora is None:
            self.policy.pipeline.save_pretrained(folder, safe_serialization=True)
            return
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if self.name_or_path == TINY_SD:
            build_tiny_pipeline(self.seed).save_pretrained(folder, safe_serialization=True)
        else:
            (folder / "base_model.txt").write_text(self.name_or_path + "\n", encoding="utf-8")
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.policy.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
