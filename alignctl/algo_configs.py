"""Per-algorithm config schemas (the ``algo`` group).

Each algo preset YAML starts with ``defaults: [/schema/algo@_here_: <name>, _self_]`` so the
preset is validated against the dataclass below while Hydra composes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024) with the reference library's GRPOConfig names and defaults (its
    learning_rate is train.lr, 1e-6 here). One step samples num_generations completions for each of
    batch_size prompts, then runs num_iterations passes of clipped updates over them."""

    name: str = "grpo"
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"
    # Prompts per step, per process; every prompt gets num_generations completions (its group).
    batch_size: int = 8
    num_generations: int = 8
    # Completions per forward/backward, and mini-batches per optimizer step: batch_size x
    # num_generations must be a multiple of mini_batch_size x gradient_accumulation_steps.
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # Updates per batch of completions (importance ratio to the sampling policy when > 1).
    num_iterations: int = 1
    # Clipping of the ratio: [1 - epsilon, 1 + epsilon_high] (epsilon_high null = epsilon; DAPO uses 0.28).
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    # KL to the reference (k3 estimator); 0 holds no reference model at all.
    beta: float = 0.0
    # grpo (per-sequence token mean) | bnpo (token mean of the micro-batch) | dr_grpo (constant
    # normaliser: rows x max_new_tokens) | dapo (token mean over the global batch of the step)
    loss_type: str = "dapo"
    # Advantage scale: group (group std) | batch (std of the whole batch) | none (Dr. GRPO)
    scale_rewards: str = "group"
    # Completions that hit max_new_tokens without stopping get no loss.
    mask_truncated_completions: bool = False
    # Print and save (samples.jsonl) a few completions with their rewards every N steps (0 = never).
    sample_every: int = 10
    num_samples_shown: int = 4


@dataclass
class RLOOConfig:
    """RLOO (Ahmadian et al. 2024) as the reference library's RLOOTrainer: rloo_k samples per prompt,
    each one's baseline the mean reward of the other k-1, the KL penalty (k1, summed over the
    sequence) folded into the reward, a sequence-level clipped REINFORCE update."""

    name: str = "rloo"
    max_prompt_length: int = 128
    truncation_mode: str = "keep_end"
    # Prompts per step, per process; every prompt gets rloo_k samples.
    batch_size: int = 8
    rloo_k: int = 2
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_ppo_epochs: int = 4
    cliprange: float = 0.2
    kl_coef: float = 0.05
    # Whiten the scores over the batch and clip them to +-reward_clip_range.
    normalize_reward: bool = False
    reward_clip_range: float = 10.0
    # Whiten the advantages over the batch.
    normalize_advantage: bool = False
    # Subtracted from the score of a sample that ended without EOS / a stop string (null = off).
    missing_eos_penalty: Optional[float] = None
    sample_every: int = 10
    num_samples_shown: int = 4


@dataclass
class IterativeSFTConfig:
    """Expert iteration / rejection sampling: each step (a round) samples num_generations
    completions per prompt, keeps the best of each prompt (or all scoring >= score_threshold) and
    fine-tunes on the kept ones with the SFT loss on completion tokens."""

    name: str = "iterative_sft"
    max_prompt_length: int = 128
    truncation_mode: str = "keep_end"
    # Prompts per round, per process.
    batch_size: int = 8
    num_generations: int = 4
    # best: the highest-scoring completion of each prompt | threshold: every completion >= score_threshold
    selection: str = "best"
    score_threshold: Optional[float] = None
    # Passes over the kept completions per round, in mini-batches, gradient_accumulation_steps per step.
    sft_epochs: int = 1
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    sample_every: int = 10
    num_samples_shown: int = 4


@dataclass
class DDPOConfig:
    """DDPO (Black et al. 2023) as the reference library's DDPOTrainer, with its DDPOConfig names
    and defaults. One alignctl step is one reference epoch: sample_num_batches_per_epoch batches
    of sample_batch_size prompts sampled, scored, then train_num_inner_epochs passes of the
    clipped update. Elsewhere: train_learning_rate = train.lr, train_adam_* = train.adam_*,
    train_adam_weight_decay = train.weight_decay, train_max_grad_norm = train.max_grad_norm,
    num_epochs = train.max_steps, save_freq = train.save_steps, num_checkpoint_limit =
    train.save_total_limit, mixed_precision = precision=, seed = train.seed; LoRA = peft=lora."""

    name: str = "ddpo"
    # Sampling: DDIM steps, eta (> 0: the step is a Gaussian policy), classifier-free guidance scale.
    sample_num_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    # Images per sampling batch (per process) and batches per epoch (= per alignctl step).
    sample_batch_size: int = 1
    sample_num_batches_per_epoch: int = 2
    # Negative prompt for classifier-free guidance ("" = the unconditional embedding).
    negative_prompts: str = ""
    # Image side in pixels; null = the pipeline's default (unet.sample_size x VAE scale).
    resolution: Optional[int] = None
    # Training: samples per forward, micro-batches per optimizer step (times the trained timesteps).
    train_batch_size: int = 1
    train_gradient_accumulation_steps: int = 1
    train_num_inner_epochs: int = 1
    # Guidance in the training forward too (needed when sampling used it).
    train_cfg: bool = True
    train_adv_clip_max: float = 5.0
    train_clip_range: float = 1e-4
    # Share of the denoising steps trained per sample (each sample's steps in random order).
    train_timestep_fraction: float = 1.0
    # Advantages from each prompt's own reward buffer (else the batch's whitened rewards).
    per_prompt_stat_tracking: bool = False
    per_prompt_stat_tracking_buffer_size: int = 16
    per_prompt_stat_tracking_min_count: int = 16
    # LoRA on the UNet's attention projections (the reference's use_lora; rank lora_rank, alpha =
    # rank, or peft=lora's r/alpha); false trains the whole UNet.
    use_lora: bool = True
    lora_rank: int = 4
    # Seed of the built-in tiny pipeline's random weights (model=tiny_sd).
    init_seed: int = 0
    # Score each sampling batch in a thread pool (max_workers threads) as soon as its images are
    # decoded, overlapping the reward with the sampling of the next batch (the reference's names);
    # same rewards as the synchronous path.
    async_reward_computation: bool = False
    max_workers: int = 2
    # Prompt sources. By default the prompts are the dataset's `prompt` column (other columns reach
    # the reward functions as per-prompt metadata); dataset.path=FILE.txt reads one prompt per
    # non-empty line. At most one of the two below may be set, and when one is, the dataset is not
    # read (dataset.path=*.txt with either is an error): `prompts` a list of prompt strings;
    # `prompt_fn` "module:function", called once with no arguments, returning a list of prompt
    # strings or of (prompt, metadata dict) pairs whose keys reach the reward functions as columns.
    prompts: List[str] = field(default_factory=list)
    prompt_fn: Optional[str] = None
