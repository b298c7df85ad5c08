"""The trained model: load, wrap with LoRA, gradient checkpointing, NEFTune; and save it."""

from __future__ import annotations

from pathlib import Path

import torch

from alignctl.config import JobConfig
from alignctl.errors import ConfigError
from alignctl.models.load import load_causal_lm, load_reward_model
from alignctl.engine.memory_plan import enable_checkpointing
from alignctl.models.peft_wrap import check_qlora_possible, qlora_load_kwargs, wrap_lora


def build_policy(job: JobConfig, tokenizer, *, reward_head: bool = False):
    """The model to train, with the job's PEFT and memory settings applied.

    ``reward_head``: a sequence classifier with one scalar output (reward models) instead of a causal LM.
    """
    method = job.peft.method
    extra = {}
    if method == "qlora":
        check_qlora_possible()
        extra = qlora_load_kwargs()
    elif method not in ("none", "lora"):
        raise ConfigError(f"peft.method={method!r}: use none, lora or qlora")
    if reward_head:
        model = load_reward_model(job.model, tokenizer, extra_kwargs=extra)
    else:
        model = load_causal_lm(job.model, tokenizer, extra_kwargs=extra)
    model.config.use_cache = False
    if job.train.gradient_checkpointing:
        enable_checkpointing(model)
    if method in ("lora", "qlora"):
        task_type = "SEQ_CLS" if reward_head else "CAUSAL_LM"
        model = wrap_lora(model, job.peft, job.train.gradient_checkpointing, task_type=task_type)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def add_neftune_hook(model, alpha: float):
    """NEFTune (Jain et al. 2023): add Uniform(-1, 1) * alpha / sqrt(seq_len * hidden) noise to the
    input embeddings while the model is in training mode. Returns the hook handle."""
    embeddings = model.get_input_embeddings()

    def add_noise(module, _inputs, output):
        if not module.training:
            return output
        scale = alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2), dtype=torch.float32))
        return output + torch.zeros_like(output).uniform_(-1, 1) * scale.to(output.dtype)

    return embeddings.register_forward_hook(add_noise)


def save_model(
    model,
    folder: Path,
    *,
    processors=(),
    merge_adapter: bool = False,
    state_dict=None,
    model_cfg=None,
    final_folder: Path | None = None,
) -> None:
    """safetensors weights (or the LoRA adapter) and the processors (tokenizer, ...) into ``folder``.

    A LoRA adapter records its base (``models.saved.record_base``: the hub id or local folder from
    ``model_cfg``, else a copy saved in ``base/``); ``final_folder`` is where ``folder`` ends up
    once its save completes (default: ``folder``). With ``merge_adapter`` a LoRA model also writes
    base+adapter merged weights to folder/merged. ``state_dict``: full weights gathered from a
    sharded (FSDP/DeepSpeed) model, saved instead of the model's own (local shard) parameters.
    """
    from alignctl.models.saved import is_adapter, record_base

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    for processor in processors:
        processor.save_pretrained(folder)
    if is_adapter(model) and model_cfg is not None:
        record_base(model, folder, final_folder or folder, model_cfg, processors, state_dict)
    if merge_adapter and hasattr(model, "merge_and_unload") and state_dict is None:
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder / "merged", safe_serialization=True)
        for processor in processors:
            processor.save_pretrained(folder / "merged")
