"""``train.gradient_checkpointing=null``: checkpoint only when the run would not fit its memory budget.

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
that for pairs and KTO's KL rows), times 1.15 for allocator slack. Checkpointing is turned on when
that exceeds ``train.memory_budget_gb`` (null: 90% of the GPU's memory, or on a CPU 90% of what the
process holds plus what the system has available).
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
    setting = job.train.gradient_checkpointing
    estimate = estimate_memory(job, policy, [m for m in others if m is not None], device)
    without, with_ = estimate.peak(False), estimate.peak(True)
    if setting is not None:
        notes.append(("gradient checkpointing", f"{'on' if setting else 'off'} (train.gradient_checkpointing={str(setting).lower()}; "
                      f"estimated peak {(with_ if setting else without) / GB:.1f} GB)"))
        return bool(setting)
    budget, source = memory_budget(job, device)
    if without <= budget:
        notes.append(("gradient checkpointing", f"off (estimated peak {without / GB:.1f} GB within the {source} of {budget / GB:.1f} GB)"))
        return False
    enable_checkpointing(policy)
    verdict = "fits" if with_ <= budget else "still over: lower train.per_device_batch_size or algo.max_length"
    notes.append(("gradient checkpointing", f"on (estimated peak {without / GB:.1f} GB > the {source} of {budget / GB:.1f} GB; "
                  f"with checkpointing {with_ / GB:.1f} GB, {verdict})"))
    return True


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


def memory_budget(job: DictConfig, device: torch.device) -> Tuple[float, str]:
    """(bytes, where the figure comes from)."""
    if job.train.memory_budget_gb is not None:
        return job.train.memory_budget_gb * GB, "train.memory_budget_gb budget"
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory, "budget (90% of the GPU)"
    return 0.9 * (resident_bytes() + available_bytes()), "budget (90% of the memory this process can have)"


def resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def available_bytes() -> float:
    """What the system can still give (MemAvailable, or a cgroup limit when lower)."""
    available = float("inf")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available if available != float("inf") else 8.0 * GB
