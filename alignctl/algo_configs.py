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


@dataclass
class PairwiseDataConfig:
    """Length limits of the pairwise (prompt, chosen, rejected) data path."""

    # Longest prompt + answer, in tokens.
    max_length: int = 512
    # Longest prompt, in tokens (the prompt is cut first when a pair is too long).
    max_prompt_length: int = 128
    # Which end of a too-long prompt survives: keep_end keeps its end (the latest turns).
    truncation_mode: str = "keep_end"
    # Append EOS after each answer.
    add_eos: bool = True


@dataclass
class DPOConfig(PairwiseDataConfig):
    name: str = "dpo"
    # Strength of the implicit KL constraint to the reference (tau for IPO).
    beta: float = 0.1
    # sigmoid, hinge, ipo, robust, kto_pair, bco_pair, sppo_hard, nca_pair, aot, aot_pair, exo_pair,
    # apo_zero, apo_down, discopop.
    loss_type: str = "sigmoid"
    # Conservative DPO / robust DPO: assumed probability that a preference label is flipped.
    label_smoothing: float = 0.0
    # Use no reference model (an implicit uniform reference).
    reference_free: bool = False
    # Compute the reference log-probs once over the data before training, then drop the reference.
    precompute_ref_logps: bool = False
    # Temperature of DiscoPOP's log-ratio modulation.
    discopop_tau: float = 0.05


@dataclass
class RewardConfig(PairwiseDataConfig):
    name: str = "reward"
    max_prompt_length: int = 256
    # Weight of the auxiliary loss pulling mean rewards towards zero (Eisenstein et al. 2023); null = off.
    center_rewards_coefficient: Optional[float] = None


@dataclass
class CPOConfig(PairwiseDataConfig):
    name: str = "cpo"
    beta: float = 0.1
    # sigmoid, hinge, ipo, simpo (simpo and ipo use length-normalised log-probs).
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (used by loss_type=simpo).
    simpo_gamma: float = 0.5
    # Weight of the NLL term on chosen answers; 0 with loss_type=simpo is pure SimPO.
    cpo_alpha: float = 1.0


@dataclass
class ORPOConfig(PairwiseDataConfig):
    name: str = "orpo"
    # Weight of the odds-ratio term (lambda in the paper) beside the NLL on chosen answers.
    beta: float = 0.1


@dataclass
class KTOConfig(PairwiseDataConfig):
    name: str = "kto"
    beta: float = 0.1
    # kto | apo_zero_unpaired
    loss_type: str = "kto"
    # Loss weights of desirable / undesirable examples (the paper keeps
    # desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # Compute the reference log-probs once over the data before training, then drop the reference.
    precompute_ref_logps: bool = False
