"""Per-algorithm config schemas (the ``algo`` group).

Each algo preset YAML starts with ``defaults: [/schema/algo@_here_: <name>, _self_]`` so the
preset is validated against the dataclass below while Hydra composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SFTConfig:
    name: str = "sft"
    # Longest sequence (prompt + completion, or packed row) in tokens.
    max_length: int = 512
    # Which end of a too-long example survives: keep_start drops the tail, keep_end the head.
    truncation_mode: str = "keep_start"
    # prompt/completion data: train on completion tokens only (prompt labels masked).
    completion_only_loss: bool = True
    # Conversational data: train on assistant turns only.
    assistant_only_loss: bool = True
    # Append the tokenizer's EOS token after each plain-text example / completion.
    add_eos: bool = True
    # Concatenate examples into rows of max_length tokens; attention never crosses examples.
    packing: bool = False
    # NEFTune: uniform noise of scale alpha/sqrt(seq_len*hidden) on input embeddings while training.
    neftune_noise_alpha: Optional[float] = None
