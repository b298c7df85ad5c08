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


@dataclass
class PPOConfig:
    """PPO (Schulman et al. 2017) for language models as in Ziegler et al. 2019; knobs and defaults
    of the reference library's PPOConfig. Its learning_rate, max_grad_norm, seed and steps are
    train.lr (1.41e-5 here), train.max_grad_norm (0 = no clipping, as its None), train.seed and
    train.max_steps (one step = one rollout batch and its updates)."""

    name: str = "ppo"
    # Longest prompt in tokens (a longer one is cut; keep_end keeps its end).
    max_prompt_length: int = 128
    truncation_mode: str = "keep_end"
    # Prompts per rollout batch, per process (responses sampled and scored together).
    batch_size: int = 128
    # Rows per forward/backward in the update epochs.
    mini_batch_size: int = 128
    # Mini-batches per optimizer step: batch_size must be a multiple of mini_batch_size * this.
    gradient_accumulation_steps: int = 1
    # Passes over each rollout batch.
    ppo_epochs: int = 4
    # KL penalty coefficient: adaptive (target/horizon controller of Ziegler et al.) or fixed.
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0
    # Per-token KL estimate in the reward: kl (= k1, logp - ref), abs, mse, k3, full (whole vocabulary).
    kl_penalty: str = "kl"
    # GAE discount and lambda.
    gamma: float = 1.0
    lam: float = 0.95
    # Clipping of the probability ratio and of the value update.
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    # Weight of the value loss.
    vf_coef: float = 0.1
    # Stop the epochs of a batch early when the policy KL exceeds 1.5 x target_kl.
    early_stopping: bool = False
    target_kl: float = 1.0
    # Skip (zero) a mini-batch whose mean probability ratio exceeds this.
    ratio_threshold: float = 10.0
    # Scale scores by their running std (and, with use_score_norm, centre them); clip to +-score_clip.
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: Optional[float] = None
    # Whiten the per-token rewards before GAE.
    whiten_rewards: bool = False
    # Subtracted from the score of a response that ended without EOS / a stop string (null = off).
    missing_eos_penalty: Optional[float] = None
    # null: a value head on the policy; or a path to a one-output classifier (e.g. the reward model's
    # run directory) that becomes a separate value model.
    value_model: Optional[str] = None
    # Print and save (samples.jsonl) a few completions with their scores every N steps (0 = never).
    sample_every: int = 10
    num_samples_shown: int = 4
