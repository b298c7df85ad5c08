"""Typed schema of a run.

One dataclass per config group. They are registered in Hydra's ConfigStore (``register_schemas``)
and every preset YAML names its schema in its defaults list, so a misspelt key or a value of the
wrong type fails while Hydra composes the config, with the key's full path in the message.

Per-algorithm configs live in ``alignctl.algo_configs``; this module holds the groups every
algorithm shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ArchConfig:
    """A Llama-architecture model built from scratch with random weights (no download)."""

    # Width of the residual stream.
    hidden_size: int = 64
    # Width of the MLP.
    intermediate_size: int = 128
    # Transformer blocks.
    num_hidden_layers: int = 2
    # Attention heads (hidden_size must be a multiple of it).
    num_attention_heads: int = 4
    # Key/value heads (grouped-query attention; divides num_attention_heads).
    num_key_value_heads: int = 2
    # Context length the position embeddings are built for.
    max_position_embeddings: int = 1024
    # Vocabulary of the built-in byte-level tokenizer (bytes + learned merges + specials).
    vocab_size: int = 512
    # Seed of the random weights (independent of train.seed, so a tiny model is the same model).
    init_seed: int = 0


@dataclass
class ModelConfig:
    # Hub id (``org/name``) or local directory of a transformers model.
    name_or_path: str = MISSING
    # GGUF file to read weights and tokenizer from (a file name inside ``name_or_path``, or a path).
    gguf_file: Optional[str] = None
    # Build a random model of this architecture instead of loading ``name_or_path`` (tests, smoke runs).
    arch: Optional[ArchConfig] = None
    # Git revision of a hub model.
    revision: Optional[str] = None
    # Run code shipped with a hub model. Off: only enable for repositories you trust.
    trust_remote_code: bool = False
    # Attention kernel: sdpa (default), eager, flash_attention_2, ...
    attn_implementation: Optional[str] = None
    # Tokenizer to load when it differs from the model.
    tokenizer_name_or_path: Optional[str] = None
    # Reference model for preference algorithms when it differs from the starting policy.
    ref_name_or_path: Optional[str] = None


@dataclass
class DatasetConfig:
    # Preset name (shown in summaries).
    name: str = MISSING
    # Local file or directory (jsonl, json, parquet, csv), ``builtin:FILE`` for data shipped with
    # alignctl, or a hub dataset id.
    path: str = MISSING
    # Hub dataset configuration name.
    subset: Optional[str] = None
    # Split used for training.
    train_split: str = "train"
    # Split used for evaluation; when absent, ``eval_fraction`` of the training split is held out.
    eval_split: Optional[str] = None
    # Fraction of the training rows held out for evaluation; 0: no evaluation; null (auto): 5% when
    # the training split has at least 2,000 rows, none for smaller data (no rows taken unasked).
    eval_fraction: Optional[float] = None
    # Rename columns to the names alignctl expects: {expected_name: name_in_your_data}.
    columns: Dict[str, str] = field(default_factory=dict)
    # Use at most this many training rows (after the eval split).
    max_rows: Optional[int] = None
    # Use at most this many evaluation rows (the first ones of the eval split or held-out rows).
    max_eval_rows: Optional[int] = None
    # Skip rows that cannot be used (and report how many) instead of stopping at the first one.
    skip_invalid: bool = False


@dataclass
class PeftConfig:
    # none | lora | qlora
    method: str = "none"
    # LoRA rank (inner width of the low-rank update).
    r: int = 16
    # LoRA scale numerator: the update is multiplied by alpha / r.
    alpha: int = 32
    # Dropout on the LoRA branch's input.
    dropout: float = 0.05
    # Module names to adapt, or ["all-linear"] for every linear layer but the output head.
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full and saved beside the adapter (e.g. ["lm_head"]).
    modules_to_save: Optional[List[str]] = None
    # Also write merged full weights (base + adapter) into final_model/merged.
    merge_on_save: bool = False


@dataclass
class PrecisionConfig:
    # auto | fp32 | bf16 | fp16: passed to accelerate as mixed precision (autocast; master weights fp32).
    # auto (the default) becomes bf16 where the hardware runs it fast, else fp32 (alignctl/precision.py).
    name: str = "auto"
    # Set when auto chose the preset: why (recorded in the run's config.yaml and summary).
    auto_reason: Optional[str] = None


@dataclass
class FSDPConfig:
    # full_shard | hybrid_shard | shard_grad_op | no_shard
    sharding_strategy: str = "full_shard"
    # Transformer layer class to wrap; null = taken from the model (its _no_split_modules).
    transformer_layer_cls_to_wrap: Optional[str] = None
    # Keep parameters on the CPU between uses (saves GPU memory, costs speed).
    cpu_offload: bool = False
    # full_state_dict (one file, gathered on rank 0) | sharded_state_dict
    state_dict_type: str = "full_state_dict"


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    zero_stage: int = 2
    # Offload optimizer state to the CPU (stages 1-3).
    offload_optimizer: bool = False
    # Offload parameters to the CPU (stage 3 only).
    offload_params: bool = False


@dataclass
class LauncherConfig:
    # local (this process) | ddp | fsdp | deepspeed
    name: str = "local"
    # Processes per machine (usually one per GPU).
    num_processes: int = 1
    # Machines taking part (each runs num_processes processes).
    num_machines: int = 1
    # Rank of this machine (0 on the main one).
    machine_rank: int = 0
    # Address and port the processes meet at (the main machine); needed with num_machines > 1.
    main_process_ip: Optional[str] = None
    # Port on main_process_ip.
    main_process_port: int = 29500
    # Settings of launcher=fsdp.
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    # Settings of launcher=deepspeed.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class TrainConfig:
    # Seed of initialisation, shuffling, dropout and sampling (a run is repeatable with it).
    seed: int = 42
    # Optimizer steps to run; -1 means run ``num_epochs`` epochs.
    max_steps: int = -1
    # Passes over the training data (fractions allowed); used when max_steps is -1.
    num_epochs: float = 3.0
    # Examples per forward/backward on each process (pairs for preference algorithms).
    per_device_batch_size: int = 8
    # Evaluation batch size; defaults to per_device_batch_size.
    per_device_eval_batch_size: Optional[int] = None
    # Micro-batches per optimizer step (global batch = per_device_batch_size x this x processes).
    gradient_accumulation_steps: int = 1
    # Peak learning rate (AdamW).
    lr: float = 5e-5
    # constant | linear | cosine (each after warmup)
    lr_scheduler: str = "linear"
    # Optimizer steps of linear warmup from 0 to lr.
    warmup_steps: int = 0
    # Warmup as a fraction of the total steps (used when warmup_steps is 0).
    warmup_ratio: float = 0.0
    # AdamW's decoupled weight decay (not applied to biases and norm weights).
    weight_decay: float = 0.0
    # AdamW's first-moment decay.
    adam_beta1: float = 0.9
    # AdamW's second-moment decay.
    adam_beta2: float = 0.999
    # AdamW's epsilon (added to the denominator).
    adam_epsilon: float = 1e-8
    # Clip the global gradient norm to this value (0 disables clipping).
    max_grad_norm: float = 1.0
    # Recompute activations in backward to save memory (about 10-25% slower). null: on for the
    # offline algorithms (unless train.memory_budget_gb says the run fits without it); online ones
    # and DDPO leave it off.
    gradient_checkpointing: Optional[bool] = None
    # With gradient_checkpointing=null: the memory, in GiB, an offline run may use; checkpointing is
    # then on only when the estimated peak exceeds it (speed where memory allows). null: always on.
    memory_budget_gb: Optional[float] = None
    # Log every N optimizer steps (the first and last steps are always logged).
    logging_steps: int = 10
    # Evaluate every N optimizer steps (0: only at the end, when there is eval data).
    eval_steps: int = 0
    # Write a checkpoint every N optimizer steps (0: none during training).
    save_steps: int = 500
    # Keep at most this many checkpoints (oldest pruned after a new one is complete); null keeps all.
    # 3: the newest plus two older ones that resume=auto falls back to if the newest is damaged.
    save_total_limit: Optional[int] = 3
    # Positions per chunk when the LM head is applied to compute log-probs.
    logps_chunk_size: int = 256
    # Batch examples of similar length (less padding): shuffle, then sort within groups of
    # length_group_batches global batches.
    group_by_length: bool = False
    # With group_by_length: global batches per sorted group (larger = less padding, less randomness).
    length_group_batches: int = 50
    # A NaN/inf loss stops the run (naming the step and rows); true skips such batches and counts them.
    skip_nonfinite: bool = False
    # With skip_nonfinite: stop (a clear error) after this many skipped batches without a completed step.
    max_consecutive_nonfinite: int = 20
    # Offline algorithms: hand the C library's free heap pages back to the system before, during
    # and after each backward pass (glibc's malloc_trim; a lower peak on CPUs).
    # null: on for CPU runs where glibc is the C library.
    trim_heap: Optional[bool] = None


@dataclass
class GenerationConfig:
    """Sampling of the online algorithms' rollouts (read by the online algorithms; offline
    algorithms refuse a changed value)."""

    # Longest response, in new tokens.
    max_new_tokens: int = 64
    # Shortest response (EOS is suppressed before it).
    min_new_tokens: int = 0
    # Softmax temperature of sampling; the policy's log-probs are taken at the same temperature.
    temperature: float = 1.0
    # Keep the k most likely tokens (0 = off).
    top_k: int = 0
    # Nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = off).
    top_p: float = 1.0
    # Sample (true) or decode greedily (false).
    do_sample: bool = True
    # Strings that end a response (besides the tokenizer's EOS); the response keeps the stop string.
    stop_strings: List[str] = field(default_factory=list)


@dataclass
class RewardSourceConfig:
    """Where the online algorithms' scores come from: a reward model, Python functions, or both."""

    # Preset name (shown in summaries).
    name: str = "none"
    # A reward model: a run directory written by `alignctl train algo=reward` (its final_model/ is
    # used) or a model folder of a one-output sequence classifier. Uses its own tokenizer.
    model: Optional[str] = None
    # Python functions "module:function", called as fn(prompts=, completions=, completion_ids=,
    # **dataset_columns) -> list of floats (the signature of TRL's GRPO reward functions).
    functions: List[str] = field(default_factory=list)
    # One weight per source: the reward model first (when set), then the functions in order; null = all 1.
    weights: Optional[List[float]] = None
    # Reward-model scoring batch size.
    batch_size: int = 16
    # Longest text the reward model scores (prompt + completion, in its tokens; longer keeps its start).
    max_length: int = 512


@dataclass
class RunConfig:
    # Run directory; default runs/<algo>-<timestamp> under the current directory.
    output_dir: Optional[str] = None
    # Allow writing into a directory that already holds a finished run.
    overwrite: bool = False
    # Also write TensorBoard event files into <output_dir>/tensorboard (the same as report_to=[tensorboard]).
    tensorboard: bool = False
    # Experiment trackers to send metrics to, any of tensorboard, wandb, mlflow (accelerate's
    # trackers; wandb and mlflow are the optional extras alignctl[wandb] / alignctl[mlflow]).
    report_to: List[str] = field(default_factory=list)
    # Show progress: a bar on a terminal, one timestamped line per logging step otherwise; false shows
    # neither (metrics.jsonl and console.log are written either way).
    progress: bool = True
    # Offline policy algorithms (sft, dpo, cpo, orpo, simpo, kto): prompts whose generations are shown
    # and appended to samples.jsonl at each evaluation. null: 3 prompts of the eval set (of the
    # training set when there is none); N: N of them; a list of strings: those prompts; 0 or []: off.
    sample_prompts: Any = None


@dataclass
class JobConfig:
    """The whole composed config of ``alignctl train``."""

    # Typed per algorithm: the algo preset's defaults list names its schema (algo_configs).
    algo: Any = MISSING
    # The model to train and its tokenizer (model=PRESET).
    model: ModelConfig = field(default_factory=ModelConfig)
    # The training (and evaluation) data (dataset=PRESET).
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Parameter-efficient fine-tuning: none | lora | qlora (peft=PRESET).
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Mixed precision: fp32 | bf16 | fp16 (precision=PRESET).
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # How many processes and machines run the training (launcher=PRESET).
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # Optimizer, schedule, batch sizes, logging, evaluation and checkpoint cadence.
    train: TrainConfig = field(default_factory=TrainConfig)
    # Online algorithms only (ppo, grpo, rloo, iterative_sft): sampling settings and reward sources.
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Online algorithms only: where scores come from (reward=PRESET).
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    # Run directory and what is displayed or written beside the metrics.
    run: RunConfig = field(default_factory=RunConfig)
    # Continue a stopped run: "auto" (newest complete checkpoint of run.output_dir) or a checkpoint path.
    resume: Optional[str] = None
