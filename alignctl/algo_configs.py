"""Per-algorithm config schemas (the ``algo`` group).

Each algo preset YAML starts with ``defaults: [/schema/algo@_here_: <name>, _self_]`` so the
preset is validated against the dataclass below while Hydra composes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class SFTConfig:
    # The algorithm this preset runs (set by algo=PRESET; leave it).
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
    # Padding-free batches: the batch's examples (or packed rows) end to end in one row, attention
    # confined to each example by the kernel. null: on where the attention kernel supports it.
    padding_free: Optional[bool] = None
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
    # Put the tokenizer's BOS before every text prompt (TRL <= 0.11 did; 1.x does not: false).
    add_bos_to_prompt: bool = True
    # A too-long pair: answers (cut the prompt to max_prompt_length, then the answers to
    # max_length - max_prompt_length; TRL <= 0.11) | joined (keep the first max_length tokens of
    # prompt + answer, the prompt never cut; TRL 1.x; max_prompt_length/truncation_mode unused).
    truncation: str = "answers"
    # Padding-free batches: every sequence of a batch end to end in one row, no padding computed,
    # attention confined to each sequence. null: on where the attention kernel supports it
    # (sdpa, flash_attention_2/3, eager; reward models: decoder classifiers and BERT); true:
    # required; false: padded batches.
    padding_free: Optional[bool] = None


@dataclass
class DPOConfig(PairwiseDataConfig):
    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "dpo"
    # Strength of the implicit KL constraint to the reference (tau for IPO).
    beta: float = 0.1
    # sigmoid, hinge, ipo, robust, kto_pair, bco_pair, sppo_hard, nca_pair, aot, aot_pair, exo_pair,
    # apo_zero, apo_down, discopop, sigmoid_norm, sft; or a list of them (summed with loss_weights).
    loss_type: Any = "sigmoid"
    # One weight per loss type of a list (null: 1.0 each); MPO: [sigmoid,bco_pair,sft] with [0.8,0.2,1.0].
    loss_weights: Optional[List[float]] = None
    # f-DPO regulariser: reverse_kl (plain DPO), forward_kl, js_divergence, alpha_divergence.
    f_divergence_type: str = "reverse_kl"
    # alpha of alpha_divergence.
    f_alpha_divergence_coef: float = 0.5
    # LD-DPO: weight in [0, 1] of the longer answer's tokens beyond the shorter one's length (null: off).
    ld_alpha: Optional[float] = None
    # RPO: adds rpo_alpha x the NLL of the chosen answers (an sft part of that weight; null: off).
    rpo_alpha: Optional[float] = None
    # WPO: weight each pair by the policy's own length-normalised probabilities of its answers (detached).
    use_weighting: bool = False
    # TR-DPO: every ref_model_sync_steps steps, reference = alpha * policy + (1 - alpha) * reference
    # (alpha = 1: hard sync). Needs a held reference copy (peft=none, no precompute_ref_logps).
    sync_ref_model: bool = False
    # TR-DPO: alpha of the soft update (weight of the policy in the new reference).
    ref_model_mixup_alpha: float = 0.6
    # TR-DPO: optimizer steps between reference updates.
    ref_model_sync_steps: int = 512
    # Mixture-of-experts load-balancing loss weight (null: the model config's when it has routers).
    router_aux_loss_coef: Optional[float] = None
    # Conservative DPO / robust DPO: assumed probability that a preference label is flipped.
    label_smoothing: float = 0.0
    # Use no reference model (an implicit uniform reference).
    reference_free: bool = False
    # Compute the reference log-probs once over the data before training (with the starting policy
    # itself, or model.ref_name_or_path); training then holds no reference model. null: on when the
    # reference would be a held model and the run covers the training data at least once.
    precompute_ref_logps: Optional[bool] = None
    # Temperature of DiscoPOP's log-ratio modulation.
    discopop_tau: float = 0.05


@dataclass
class RewardConfig(PairwiseDataConfig):
    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "reward"
    max_prompt_length: int = 256
    # Weight of the auxiliary loss pulling mean rewards towards zero (Eisenstein et al. 2023); null = off.
    center_rewards_coefficient: Optional[float] = None


@dataclass
class CPOConfig(PairwiseDataConfig):
    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "cpo"
    # Scale of the log-prob margin between chosen and rejected inside the preference loss.
    beta: float = 0.1
    # sigmoid, hinge, ipo, simpo (simpo and ipo use length-normalised log-probs).
    loss_type: str = "sigmoid"
    # Assumed probability that a preference label is flipped (conservative sigmoid loss).
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (used by loss_type=simpo).
    simpo_gamma: float = 0.5
    # Weight of the NLL term on chosen answers; 0 with loss_type=simpo is pure SimPO.
    cpo_alpha: float = 1.0
    # AlphaPO reward shape: r = (1 - p^-alpha) / alpha instead of log p (0: plain log-probs).
    alpha: float = 0.0
    # Mixture-of-experts load-balancing loss weight (null: on when the model config sets output_router_logits).
    router_aux_loss_coef: Optional[float] = None


@dataclass
class ORPOConfig(PairwiseDataConfig):
    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "orpo"
    # Weight of the odds-ratio term (lambda in the paper) beside the NLL on chosen answers.
    beta: float = 0.1
    # Mixture-of-experts load-balancing loss weight (null: on when the model config sets output_router_logits).
    router_aux_loss_coef: Optional[float] = None


@dataclass
class KTOConfig(PairwiseDataConfig):
    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "kto"
    # Strength of the implicit KL constraint to the reference (scale of the log-ratios).
    beta: float = 0.1
    # kto | apo_zero_unpaired
    loss_type: str = "kto"
    # Loss weights of desirable / undesirable examples (the paper keeps
    # desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]).
    desirable_weight: float = 1.0
    # Loss weight of undesirable (label false) examples; see desirable_weight.
    undesirable_weight: float = 1.0
    # Compute the reference log-probs once over the data before training (with the starting policy
    # itself, or model.ref_name_or_path); training then holds no reference model. null: on when the
    # reference would be a held model and the run covers the training data at least once.
    precompute_ref_logps: Optional[bool] = None


@dataclass
class PPOConfig:
    """PPO (Schulman et al. 2017) for language models as in Ziegler et al. 2019; knobs and defaults
    of the reference library's PPOConfig. Its learning_rate, max_grad_norm, seed and steps are
    train.lr (1.41e-5 here), train.max_grad_norm (0 = no clipping, as its None), train.seed and
    train.max_steps (one step = one rollout batch and its updates)."""

    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "ppo"
    # Longest prompt in tokens (a longer one is cut; keep_end keeps its end).
    max_prompt_length: int = 128
    # Which end of a too-long prompt survives: keep_end keeps its end, keep_start its start.
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
    # Starting KL coefficient (the fixed one when adap_kl_ctrl is false).
    init_kl_coef: float = 0.2
    # Adaptive control: the KL per response the controller steers towards.
    target: float = 6.0
    # Adaptive control: steps over which the coefficient adapts (larger = slower).
    horizon: float = 10000.0
    # Per-token KL estimate in the reward: kl (= k1, logp - ref), abs, mse, k3, full (whole vocabulary).
    kl_penalty: str = "kl"
    # GAE discount factor.
    gamma: float = 1.0
    # GAE lambda (bias/variance trade-off of the advantages).
    lam: float = 0.95
    # Clipping of the probability ratio: [1 - cliprange, 1 + cliprange].
    cliprange: float = 0.2
    # Clipping of the value update around the rollout's values.
    cliprange_value: float = 0.2
    # Weight of the value loss.
    vf_coef: float = 0.1
    # Stop the epochs of a batch early when the policy KL exceeds 1.5 x target_kl.
    early_stopping: bool = False
    # With early_stopping: the policy KL threshold (the epochs stop above 1.5 x target_kl).
    target_kl: float = 1.0
    # Skip (zero) a mini-batch whose mean probability ratio exceeds this.
    ratio_threshold: float = 10.0
    # Scale scores by their running std (and, with use_score_norm, centre them); clip to +-score_clip.
    use_score_scaling: bool = False
    # With use_score_scaling: also subtract the running mean of the scores.
    use_score_norm: bool = False
    # Clip the (scaled) scores to +-score_clip (null = off).
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
    # Completions printed and saved at each sample_every step.
    num_samples_shown: int = 4


@dataclass
class GRPOConfig:
    """GRPO (Shao et al. 2024) with the reference library's GRPOConfig names and defaults (its
    learning_rate is train.lr, 1e-6 here). One step samples num_generations completions for each of
    batch_size prompts, then runs num_iterations passes of clipped updates over them."""

    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "grpo"
    # Longest prompt in tokens (a longer one is cut as truncation_mode says).
    max_prompt_length: int = 512
    # Which end of a too-long prompt survives: keep_end keeps its end, keep_start its start.
    truncation_mode: str = "keep_end"
    # Prompts per step, per process; every prompt gets num_generations completions (its group).
    batch_size: int = 8
    # Completions sampled per prompt (the group whose rewards normalise the advantages).
    num_generations: int = 8
    # Completions per forward/backward, and mini-batches per optimizer step: batch_size x
    # num_generations must be a multiple of mini_batch_size x gradient_accumulation_steps.
    mini_batch_size: int = 8
    # Mini-batches per optimizer step.
    gradient_accumulation_steps: int = 1
    # Updates per batch of completions (importance ratio to the sampling policy when > 1).
    num_iterations: int = 1
    # Clipping of the ratio: [1 - epsilon, 1 + epsilon_high] (epsilon_high null = epsilon; DAPO uses 0.28).
    epsilon: float = 0.2
    # Upper clipping bound 1 + epsilon_high (null = epsilon; DAPO uses 0.28).
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
    # Completions printed and saved at each sample_every step.
    num_samples_shown: int = 4


@dataclass
class RLOOConfig:
    """RLOO (Ahmadian et al. 2024) as the reference library's RLOOTrainer: rloo_k samples per prompt,
    each one's baseline the mean reward of the other k-1, the KL penalty (k1, summed over the
    sequence) folded into the reward, a sequence-level clipped REINFORCE update."""

    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "rloo"
    # Longest prompt in tokens (a longer one is cut as truncation_mode says).
    max_prompt_length: int = 128
    # Which end of a too-long prompt survives: keep_end keeps its end, keep_start its start.
    truncation_mode: str = "keep_end"
    # Prompts per step, per process; every prompt gets rloo_k samples.
    batch_size: int = 8
    # Samples per prompt; each one's baseline is the mean reward of the other rloo_k - 1.
    rloo_k: int = 2
    # Samples per forward/backward in the update epochs.
    mini_batch_size: int = 8
    # Mini-batches per optimizer step.
    gradient_accumulation_steps: int = 1
    # Passes over each batch of samples.
    num_ppo_epochs: int = 4
    # Clipping of the sequence-level probability ratio: [1 - cliprange, 1 + cliprange].
    cliprange: float = 0.2
    # Weight of the KL penalty (k1, summed over the sequence) subtracted from the reward.
    kl_coef: float = 0.05
    # Whiten the scores over the batch and clip them to +-reward_clip_range.
    normalize_reward: bool = False
    # With normalize_reward: the whitened scores are clipped to +-reward_clip_range.
    reward_clip_range: float = 10.0
    # Whiten the advantages over the batch.
    normalize_advantage: bool = False
    # Subtracted from the score of a sample that ended without EOS / a stop string (null = off).
    missing_eos_penalty: Optional[float] = None
    # Print and save (samples.jsonl) a few samples with their rewards every N steps (0 = never).
    sample_every: int = 10
    # Completions printed and saved at each sample_every step.
    num_samples_shown: int = 4


@dataclass
class IterativeSFTConfig:
    """Expert iteration / rejection sampling: each step (a round) samples num_generations
    completions per prompt, keeps the best of each prompt (or all scoring >= score_threshold) and
    fine-tunes on the kept ones with the SFT loss on completion tokens."""

    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "iterative_sft"
    # Longest prompt in tokens (a longer one is cut as truncation_mode says).
    max_prompt_length: int = 128
    # Which end of a too-long prompt survives: keep_end keeps its end, keep_start its start.
    truncation_mode: str = "keep_end"
    # Prompts per round, per process.
    batch_size: int = 8
    # Completions sampled per prompt each round.
    num_generations: int = 4
    # best: the highest-scoring completion of each prompt | threshold: every completion >= score_threshold
    selection: str = "best"
    # selection=threshold: the lowest score a kept completion may have.
    score_threshold: Optional[float] = None
    # Passes over the kept completions per round, in mini-batches, gradient_accumulation_steps per step.
    sft_epochs: int = 1
    # Kept completions per forward/backward.
    mini_batch_size: int = 8
    # Mini-batches per optimizer step.
    gradient_accumulation_steps: int = 1
    # Print and save (samples.jsonl) a few completions with their scores every N rounds (0 = never).
    sample_every: int = 10
    # Completions printed and saved at each sample_every step.
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

    # The algorithm this preset runs (set by algo=PRESET; leave it).
    name: str = "ddpo"
    # DDIM denoising steps per image.
    sample_num_steps: int = 50
    # DDIM eta (> 0: each denoising step is a Gaussian policy, which DDPO needs).
    sample_eta: float = 1.0
    # Classifier-free guidance scale of sampling.
    sample_guidance_scale: float = 5.0
    # Images per sampling batch, per process.
    sample_batch_size: int = 1
    # Sampling batches per epoch (= per alignctl step).
    sample_num_batches_per_epoch: int = 2
    # Negative prompt for classifier-free guidance ("" = the unconditional embedding).
    negative_prompts: str = ""
    # Image side in pixels; null = the pipeline's default (unet.sample_size x VAE scale).
    resolution: Optional[int] = None
    # Samples per training forward.
    train_batch_size: int = 1
    # Micro-batches per optimizer step (times the trained timesteps).
    train_gradient_accumulation_steps: int = 1
    # Passes of the clipped update over each epoch's samples.
    train_num_inner_epochs: int = 1
    # Guidance in the training forward too (needed when sampling used it).
    train_cfg: bool = True
    # Advantages are clipped to +-train_adv_clip_max.
    train_adv_clip_max: float = 5.0
    # Clipping of the per-step probability ratio: [1 - train_clip_range, 1 + train_clip_range].
    train_clip_range: float = 1e-4
    # Share of the denoising steps trained per sample (each sample's steps in random order).
    train_timestep_fraction: float = 1.0
    # Advantages from each prompt's own reward buffer (else the batch's whitened rewards).
    per_prompt_stat_tracking: bool = False
    # Rewards kept per prompt for its statistics.
    per_prompt_stat_tracking_buffer_size: int = 16
    # A prompt with fewer rewards than this uses the whole batch's statistics.
    per_prompt_stat_tracking_min_count: int = 16
    # LoRA on the UNet's attention projections (the reference's use_lora; rank lora_rank, alpha =
    # rank, or peft=lora's r/alpha); false trains the whole UNet.
    use_lora: bool = True
    # Rank of the UNet LoRA (when use_lora).
    lora_rank: int = 4
    # Seed of the built-in tiny pipeline's random weights (model=tiny_sd).
    init_seed: int = 0
    # Score each sampling batch in a thread pool (max_workers threads) as soon as its images are
    # decoded, overlapping the reward with the sampling of the next batch (the reference's names);
    # same rewards as the synchronous path.
    async_reward_computation: bool = False
    # Threads scoring the batches when async_reward_computation is on.
    max_workers: int = 2
    # Prompt sources. By default the prompts are the dataset's `prompt` column (other columns reach
    # the reward functions as per-prompt metadata); dataset.path=FILE.txt reads one prompt per
    # non-empty line. At most one of the two below may be set, and when one is, the dataset is not
    # read (dataset.path=*.txt with either is an error): `prompts` a list of prompt strings;
    # `prompt_fn` "module:function", called once with no arguments, returning a list of prompt
    # strings or of (prompt, metadata dict) pairs whose keys reach the reward functions as columns.
    prompts: List[str] = field(default_factory=list)
    # "module:function" returning the prompts (or (prompt, metadata) pairs); see prompts above.
    prompt_fn: Optional[str] = None
