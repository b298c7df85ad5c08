"""The typed rollout batch of the online algorithms.

A rollout is what one iteration of an online loop produced and later phases fill in: prompts
(left-padded, so every response starts at the same column), sampled responses (right-padded, mask 1
on kept tokens including the stop token), and per-token or per-sequence quantities computed from
them. Fields are named, not keyed by position, and ``select`` / ``minibatches`` slice every tensor
field together so rows never get out of step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, List, Optional

import torch

from alignctl.data.encode import IGNORE_INDEX


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long
    response_ids: torch.Tensor  # [B, R] long, right-padded
    response_mask: torch.Tensor  # [B, R] long: 1 on kept response tokens (stop token included)
    row_index: torch.Tensor  # [B] long: data set row of each prompt
    group_ids: torch.Tensor  # [B] long: rows sharing a prompt share a group (GRPO/RLOO groups)
    finished: Optional[torch.Tensor] = None  # [B] bool: ended with EOS / a stop string
    logprobs: Optional[torch.Tensor] = None  # [B, R] old (sampling policy) log-probs
    ref_logprobs: Optional[torch.Tensor] = None  # [B, R] reference log-probs
    values: Optional[torch.Tensor] = None  # [B, R] value estimates
    scores: Optional[torch.Tensor] = None  # [B] sequence scores (after scaling / penalties)
    advantages: Optional[torch.Tensor] = None  # [B, R]
    returns: Optional[torch.Tensor] = None  # [B, R]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    # ------------------------------------------------------------------ model inputs
    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (prompts are left-padded)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def labels(self) -> torch.Tensor:
        """Response tokens as labels (prompt and padding ignored), aligned with ``input_ids``."""
        response = self.response_ids.masked_fill(self.response_mask == 0, IGNORE_INDEX)
        prompt = torch.full_like(self.prompt_ids, IGNORE_INDEX)
        return torch.cat([prompt, response], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    # ------------------------------------------------------------------ slicing
    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` of every tensor field (a new Rollout)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index.to(value.device)] if isinstance(value, torch.Tensor) else value
        return replace(self, **picked)

    def minibatches(self, size: int, generator: Optional[torch.Generator] = None) -> Iterator["Rollout"]:
        """Shuffled mini-batches of ``size`` rows (the last may be smaller), drawn with ``generator``
        (or the global RNG, which a checkpoint restores)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size])

    def to(self, device: torch.device) -> "Rollout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def trimmed(self) -> "Rollout":
        """Drop response columns that are padding in every row (after selecting short rows)."""
        width = int(self.response_mask.sum(dim=0).nonzero().max()) + 1 if self.response_mask.any() else 1
        if width == self.response_ids.shape[1]:
            return self
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and f.name not in ("prompt_ids", "prompt_mask"):
                cut[f.name] = value[:, :width]
        return replace(self, **cut)


def stack_rollouts(parts: List[Rollout]) -> Rollout:
    """Concatenate rollouts row-wise (padding prompts on the left and responses on the right)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    response_width = max(p.response_ids.shape[1] for p in parts)
    merged = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            merged[f.name] = None
            continue
        if values[0].dim() == 2:
            left = f.name in ("prompt_ids", "prompt_mask")
            width = prompt_width if left else response_width
            values = [_pad(v, width, left=left) for v in values]
        merged[f.name] = torch.cat(values, dim=0)
    return Rollout(**merged)


def _pad(value: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    missing = width - value.shape[1]
    if missing == 0:
        return value
    pad = value.new_zeros(value.shape[0], missing)
    return torch.cat([pad, value] if left else [value, pad], dim=1)
