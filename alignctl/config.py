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
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
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
    # Fraction of the training rows held out for evaluation (0 disables evaluation).
    eval_fraction: float = 0.0
    # Rename columns to the names alignctl expects: {expected_name: name_in_your_data}.
    columns: Dict[str, str] = field(default_factory=dict)
    # Use at most this many training rows (after the eval split).
    max_rows: Optional[int] = None
    # Skip rows that cannot be used (and report how many) instead of stopping at the first one.
    skip_invalid: bool = False


@dataclass
class PeftConfig:
    # none | lora | qlora
    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names to adapt, or ["all-linear"] for every linear layer but the output head.
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full and saved beside the adapter (e.g. ["lm_head"]).
    modules_to_save: Optional[List[str]] = None
    # Also write merged full weights (base + adapter) into final_model/merged.
    merge_on_save: bool = False


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp16: passed to accelerate as mixed precision (autocast; master weights fp32).
    name: str = "fp32"


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
    # Offload optimizer state (stages 1-3) and parameters (stage 3) to the CPU.
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class LauncherConfig:
    # local (this process) | ddp | fsdp | deepspeed
    name: str = "local"
    # Processes per machine (usually one per GPU).
    num_processes: int = 1
    num_machines: int = 1
    # Rank of this machine (0 on the main one).
    machine_rank: int = 0
    # Address and port the processes meet at (the main machine); needed with num_machines > 1.
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class TrainConfig:
    seed: int = 42
    # Optimizer steps to run; -1 means run ``num_epochs`` epochs.
    max_steps: int = -1
    num_epochs: float = 3.0
    per_device_batch_size: int = 8
    # Evaluation batch size; defaults to per_device_batch_size.
    per_device_eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    lr: float = 5e-5
    # constant | linear | cosine (each after warmup)
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    # Warmup as a fraction of the total steps (used when warmup_steps is 0).
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # Clip the global gradient norm to this value (0 disables clipping).
    max_grad_norm: float = 1.0
    # Recompute activations in backward to save memory.
    gradient_checkpointing: bool = False
    # Log every N optimizer steps (the first and last steps are always logged).
    logging_steps: int = 10
    # Evaluate every N optimizer steps (0: only at the end, when there is eval data).
    eval_steps: int = 0
    # Write a checkpoint every N optimizer steps (0: none during training).
    save_steps: int = 500
    # Keep at most this many checkpoints (oldest pruned after a new one is complete).
    save_total_limit: Optional[int] = None
    # Positions per chunk when the LM head is applied to compute log-probs.
    logps_chunk_size: int = 1024
    # Batch examples of similar length (less padding): shuffle, then sort within groups of
    # length_group_batches global batches.
    group_by_length: bool = False
    length_group_batches: int = 50
    # A NaN/inf loss stops the run (naming the step and rows); true skips such batches and counts them.
    skip_nonfinite: bool = False
    # With skip_nonfinite: stop (a clear error) after this many skipped batches without a completed step.
    max_consecutive_nonfinite: int = 20


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
    # Reward-model scoring batch size and longest scored text (prompt + completion, in its tokens).
    batch_size: int = 16
    max_length: int = 512


@dataclass
class RunConfig:
    # Run directory; default runs/<algo>-<timestamp> under the current directory.
    output_dir: Optional[str] = None
    # Allow writing into a directory that already holds a finished run.
    overwrite: bool = False
    # Also write TensorBoard event files into <output_dir>/tensorboard.
    tensorboard: bool = False
    # Show the rich progress bar (metrics.jsonl is written either way).
    progress: bool = True


@dataclass
class JobConfig:
    """The whole composed config of ``alignctl train``."""

    # Typed per algorithm: the algo preset's defaults list names its schema (algo_configs).
    algo: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Online algorithms only (ppo, grpo, rloo, iterative_sft): sampling settings and reward sources.
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Continue a stopped run: "auto" (newest complete checkpoint of run.output_dir) or a checkpoint path.
    resume: Optional[str] = None
