"""Wrap a model with LoRA (peft) and check the precision/quantization requests are possible here."""

from __future__ import annotations

from alignctl.config import PeftConfig
from alignctl.errors import ConfigError

PEFT_METHODS = ("none", "lora", "qlora")


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
