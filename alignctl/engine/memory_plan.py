"""``train.gradient_checkpointing=null``: the offline algorithms checkpoint, unless a memory budget
says the run fits without it.

Checkpointing is the default because it is what brings a full fine-tune near half the reference
library's memory (the README's Performance section has the figures). ``train.memory_budget_gb``
trades memory back for speed: checkpointing then turns on only when the estimated peak exceeds the
budget.

Once the models are built, the training peak is estimated from what is known before the first step:

- what the process holds already (CPU: its resident memory; GPU: the models' weights);
- fp32 gradients (4 bytes) and AdamW's two moments (8 bytes) per trainable parameter;
- the activations kept for backward, per token and layer (``h`` hidden size, ``i`` MLP width,
  ``kv`` key/value width; bytes measured on a Llama block and counted tensor by tensor):
  ``36h + 8kv + 16i`` at fp32, ``26h + 4kv + 8i`` under bf16/fp16 autocast (plus autocast's half
  copy of the weights, 2 bytes per parameter); with checkpointing, the fp32 layer input (``4h``)
  per layer plus one layer's activations while it is recomputed;
- one chunk of LM-head log-probs: ``min(train.logps_chunk_size, tokens) x vocabulary x 10`` bytes;

for the longest micro-batch the data allows (``per_device_batch_size x max_length`` tokens, twice
that for pairs and KTO's KL rows), times 1.15 for allocator slack. The summary prints both figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from omegaconf import DictConfig

GB = 1024**3
SLACK = 1.15  # allocator fragmentation and short-lived temporaries
LOGITS_BYTES = 10  # per (position, vocabulary entry) of a log-prob chunk, forward + backward


@dataclass
class MemoryEstimate:
    held: float  # bytes held before the first step
    states: float  # gradients + optimizer moments
    activations: float  # without checkpointing
    checkpointed_activations: float

    def peak(self, checkpointing: bool) -> float:
        acts = self.checkpointed_activations if checkpointing else self.activations
        return self.held + SLACK * (self.states + acts)


def plan_checkpointing(job: DictConfig, policy: torch.nn.Module, others: Iterable[Optional[torch.nn.Module]],
                       device: torch.device, notes: List[Tuple[str, str]]) -> bool:
    """Decide ``train.gradient_checkpointing`` (when null) for ``policy`` (the transformers model, maybe
    under peft), turn it on if needed, and say why in ``notes``. Returns whether it is on."""
    setting, budget = job.train.gradient_checkpointing, job.train.memory_budget_gb
    estimate = estimate_memory(job, policy, [m for m in others if m is not None], device)
    without, with_ = estimate.peak(False) / GB, estimate.peak(True) / GB
    if setting is not None:
        reason = f"train.gradient_checkpointing={str(setting).lower()}; estimated peak {with_ if setting else without:.1f} GB"
    elif budget is None:
        setting = True
        reason = (f"default, the least memory: estimated peak {with_:.1f} GB, {without:.1f} GB without; "
                  "train.memory_budget_gb=N turns it off when the run fits in N GB")
    elif without <= budget:
        setting = False
        reason = f"estimated peak {without:.1f} GB within train.memory_budget_gb={budget:g}"
    else:
        setting = True
        verdict = "fits" if with_ <= budget else "still over: lower train.per_device_batch_size or algo.max_length"
        reason = f"estimated peak {without:.1f} GB > train.memory_budget_gb={budget:g}; with checkpointing {with_:.1f} GB, {verdict}"
    if setting:
        enable_checkpointing(policy)
    notes.append(("gradient checkpointing", f"{'on' if setting else 'off'} ({reason})"))
    return bool(setting)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every layer (transformers' newer name where it has one)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def estimate_memory(job: DictConfig, policy: torch.nn.Module, others: List[torch.nn.Module], device: torch.device) -> MemoryEstimate:
    config = policy.config
    params = list(policy.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    others = [m for m in others if m is not policy]  # a LoRA reference is the policy with its adapter off
    weights = sum(p.numel() * p.element_size() for m in [policy, *others] for p in m.parameters())
    held = float(weights if device.type == "cuda" else resident_bytes())
    mixed = job.precision.name in ("bf16", "fp16")

    from alignctl.registry import get_algorithm

    two_rows = get_algorithm(job.algo.name).data in ("pairs", "kto")  # chosen + rejected, or main + KL rows
    tokens = job.train.per_device_batch_size * job.algo.max_length * (2 if two_rows else 1)
    layers = getattr(config, "num_hidden_layers", 1)
    h = getattr(config, "hidden_size", 0)
    i = getattr(config, "intermediate_size", None) or 4 * h
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    per_layer = (26 * h + 4 * kv + 8 * i) if mixed else (36 * h + 8 * kv + 16 * i)
    casts = 2 * sum(p.numel() for p in params) if mixed else 0
    vocab = getattr(config, "vocab_size", 0) if job.algo.name != "reward" else 0
    logits = min(job.train.logps_chunk_size, tokens) * vocab * LOGITS_BYTES
    return MemoryEstimate(
        held=held,
        states=12.0 * trainable,
        activations=float(tokens * layers * per_layer + casts + logits),
        checkpointed_activations=float(tokens * (layers * 4 * h + per_layer) + casts + logits),
    )


def resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0
