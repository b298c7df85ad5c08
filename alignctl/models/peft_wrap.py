"""Wrap a model with LoRA (peft) and check the precision/quantization requests are possible here."""

from __future__ import annotations

from alignctl.config import PeftConfig
from alignctl.errors import ConfigError

PEFT_METHODS = ("none", "lora", "qlora")


def check_peft_config(cfg: PeftConfig) -> None:
    """LoRA settings that cannot train, refused with the key to change (before anything loads)."""
    if cfg.method not in ("lora", "qlora"):
        return
    if cfg.r < 1:
        raise ConfigError(f"peft.r={cfg.r}: the LoRA rank must be a positive integer (e.g. peft.r=16)")
    if not cfg.alpha > 0:
        raise ConfigError(
            f"peft.alpha={cfg.alpha}: must be positive (the adapter is scaled by alpha / r; "
            f"e.g. peft.alpha={2 * cfg.r})"
        )
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"peft.dropout={cfg.dropout}: must be in [0, 1) (e.g. peft.dropout=0.05)")
    targets = list(cfg.target_modules or [])
    if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
        raise ConfigError(
            f"peft.target_modules={targets}: name the modules to adapt, e.g. peft.target_modules=[all-linear] or "
            "peft.target_modules=[q_proj,v_proj]"
        )
    if cfg.modules_to_save is not None and any(not isinstance(m, str) or not m.strip() for m in cfg.modules_to_save):
        raise ConfigError(f"peft.modules_to_save={list(cfg.modules_to_save)}: module names must not be empty")


def check_qlora_possible() -> None:
    """QLoRA needs bitsandbytes 4-bit kernels, which need a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "peft=qlora loads the base model in 4-bit through bitsandbytes, which needs a CUDA GPU, and "
            "none is available here; use peft=lora (full-precision base) on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("peft=qlora needs bitsandbytes: pip install bitsandbytes") from None


def qlora_load_kwargs() -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }


def wrap_lora(model, cfg: PeftConfig, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM"):
    """A peft model with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_peft_config(cfg)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = list(cfg.target_modules)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"peft.target_modules={targets}: {str(exc).splitlines()[0]}") from None
