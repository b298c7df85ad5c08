"""What every language-model algorithm on the online loop shares: prompts, the policy and its
reference, sampling and scoring a batch, sample tables, saving. PPO, GRPO, RLOO and iterative SFT
subclass ``PolicyRolloutAlgorithm`` and add only their update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from alignctl.engine.online import OnlineData
from alignctl.errors import ConfigError
from alignctl.rollout.batch import Rollout

# Fields of TrainConfig an online algorithm does not read (with the setting that replaces each).
UNUSED_TRAIN_FIELDS = {
    "per_device_batch_size": "algo.batch_size (prompts per rollout) and algo.mini_batch_size",
    "gradient_accumulation_steps": "algo.gradient_accumulation_steps",
    "per_device_eval_batch_size": None,
    "eval_steps": None,
    "group_by_length": None,
}


def check_online_job(job: DictConfig) -> None:
    """Settings an online run does not read must not be changed silently; sampling and reward
    settings are checked before anything is written."""
    from alignctl.rl.rewards import RewardSources, _model_folder
    from alignctl.rollout.generate import GenerationSettings

    refuse_unused_train_fields(job, UNUSED_TRAIN_FIELDS)
    if job.dataset.eval_split or job.dataset.eval_fraction:
        raise ConfigError(
            f"algo={job.algo.name} does not evaluate on held-out prompts yet; set dataset.eval_fraction=0 "
            "and dataset.eval_split=null"
        )
    GenerationSettings.from_config(job.generation)
    if job.reward.name == "model" and not job.reward.model:
        raise ConfigError("reward=model needs reward.model=<reward-model run directory or model folder>")
    if job.reward.model:
        _model_folder(job.reward.model)
    # imports the reward functions and checks the weights (a reward model stands in as one source)
    RewardSources(list(job.reward.functions), _PLACEHOLDER if job.reward.model else None, job.reward.weights)


def refuse_unused_train_fields(job: DictConfig, unused: Dict[str, Optional[str]]) -> None:
    """A changed ``train.<name>`` that the online algorithm does not read is refused, naming the
    setting to use instead (``unused``: name -> replacement or None)."""
    from alignctl.config import TrainConfig

    defaults = TrainConfig()
    for name, instead in unused.items():
        if job.train[name] != getattr(defaults, name):
            hint = f"; use {instead}" if instead else ""
            raise ConfigError(f"train.{name} is not used by algo={job.algo.name}{hint}")


_PLACEHOLDER = object()  # counts the reward model among the sources without loading it


@dataclass
class Sampled:
    """A scored rollout and what the reward functions saw."""

    rollout: Rollout
    prompts: List[str]
    completions: List[str]
    total: torch.Tensor  # [N] weighted reward
    per_source: Dict[str, torch.Tensor]  # name -> [N]
    timings: Dict[str, float]


class PolicyRolloutAlgorithm:
    """Base plug-in: subclasses set ``value_head`` / ``needs_reference`` and implement ``update``."""

    unit = "tokens"  # generated tokens
    value_head = False

    def __init__(self, job: DictConfig) -> None:
        self.cfg = job.algo
        self._pending_state: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ what the loop asks
    def rollout_batch_size(self, job: DictConfig) -> int:
        return job.algo.batch_size

    def accumulation_steps(self, job: DictConfig) -> int:
        return job.algo.gradient_accumulation_steps

    def needs_reference(self, job: DictConfig) -> bool:
        return True

    def prepare_data(self, job: DictConfig) -> OnlineData:
        from functools import partial

        from alignctl.data.load import load_rows
        from alignctl.data.prompts import build_prompt_examples, collate_prompts
        from alignctl.models.load import load_tokenizer

        self.tokenizer = load_tokenizer(job.model)
        raw = load_rows(job.dataset, seed=job.train.seed, hold_out=False)
        data = build_prompt_examples(
            raw.train, self.tokenizer, max_prompt_length=self.cfg.max_prompt_length,
            truncation_mode=self.cfg.truncation_mode, skip_invalid=job.dataset.skip_invalid,
        )
        notes = [("data", f"{raw.source} ({data.format}, {len(data.examples)} prompts)")]
        if data.skipped:
            notes.append(("skipped rows", f"{data.skipped} (dataset.skip_invalid=true)"))
        return OnlineData(
            train=data.examples, collate=partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id),
            notes=notes, processors=[self.tokenizer],
        )

    def build_model(self, job: DictConfig) -> torch.nn.Module:
        from alignctl.models.policy import build_policy
        from alignctl.models.reference import ReferenceModel, disable_dropout
        from alignctl.models.value_head import PolicyWithValue, load_value_model

        policy = build_policy(job, self.tokenizer)
        disable_dropout(policy)  # old and new log-probs then agree before the first update
        self.reference = None
        if self.needs_reference(job):
            self.reference = ReferenceModel.build(job, policy, self.tokenizer, reference_free=False)
        value_model = None
        if self.value_head and getattr(self.cfg, "value_model", None):
            value_model = load_value_model(self.cfg.value_model, job.model.trust_remote_code)
            disable_dropout(value_model)
        return PolicyWithValue(
            policy, value_model=value_model, with_value=self.value_head,
            temperature=float(job.generation.temperature), chunk_size=job.train.logps_chunk_size,
            init_seed=job.train.seed,
        )

    def setup(self, job: DictConfig, loop) -> None:
        from alignctl.rl.rewards import RewardModelScorer, RewardSources
        from alignctl.rollout.generate import GenerationSettings

        accelerator = loop.accelerator
        self.loop = loop
        if self.reference is not None:
            self.reference.to(accelerator.device)
        self.generation = GenerationSettings.from_config(job.generation)
        scorer = None
        if job.reward.model:
            scorer = RewardModelScorer(job.reward.model, accelerator.device, job.reward.batch_size, job.reward.max_length)
        self.rewards = RewardSources(list(job.reward.functions), scorer, job.reward.weights)
        self.setup_update(job, loop)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def setup_update(self, job: DictConfig, loop) -> None:
        """The algorithm's update machinery (optimizer is loop.optimizer)."""

    # ------------------------------------------------------------------ sampling and scoring
    def sample(self, batch: Dict[str, Any], loop, repeats: int = 1) -> Sampled:
        """``repeats`` responses per prompt (rows of one prompt contiguous, sharing a group id), scored."""
        from alignctl.rollout.generate import generate

        accelerator = loop.accelerator
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        examples = batch["examples"]
        row_index = batch["row_index"]
        if repeats > 1:
            prompt_ids = prompt_ids.repeat_interleave(repeats, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(repeats, dim=0)
            row_index = row_index.repeat_interleave(repeats, dim=0)
            examples = [e for e in examples for _ in range(repeats)]
        start = time.perf_counter()
        policy = accelerator.unwrap_model(loop.model).policy
        with accelerator.autocast():
            generated = generate(policy, self.tokenizer, prompt_ids, prompt_mask, self.generation)
        generate_s = time.perf_counter() - start
        groups = torch.arange(len(batch["examples"])).repeat_interleave(repeats)
        rollout = Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=generated.response_ids, response_mask=generated.response_mask,
            row_index=row_index, group_ids=groups, finished=generated.finished,
        ).to(accelerator.device)
        start = time.perf_counter()
        prompts = [e.prompt_text for e in examples]
        columns = {key: [e.columns.get(key) for e in examples] for key in examples[0].columns}
        completion_ids = [row[: int(n)] for row, n in zip(generated.response_ids.tolist(), generated.lengths)]
        model_prompts = [self._policy_prompt_text(e.prompt_ids) for e in examples] if self.rewards.model_scorer else None
        with accelerator.autocast():  # the reward model runs in the run's precision
            reward = self.rewards(prompts, generated.texts, completion_ids, columns, model_prompts=model_prompts)
        timings = {"generate": generate_s, "score": time.perf_counter() - start}
        return Sampled(rollout, prompts, generated.texts, reward.total.to(accelerator.device), reward.per_source, timings)

    def _policy_prompt_text(self, prompt_ids: List[int]) -> str:
        """The prompt as the policy saw it (cut to algo.max_prompt_length), without a leading BOS
        (the reward model's tokenizer adds its own)."""
        bos = self.tokenizer.bos_token_id
        ids = prompt_ids[1:] if bos is not None and prompt_ids and prompt_ids[0] == bos else prompt_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def completion_metrics(self, sampled: Sampled, prefix: str) -> Dict[str, torch.Tensor]:
        """Reward per source and completion lengths (mean/min/max, share that hit max_new_tokens)."""
        lengths = sampled.rollout.response_lengths.float()
        metrics = {
            f"{prefix}reward": sampled.total.float().mean(),
            f"{prefix}reward_std": sampled.total.float().std() if len(lengths) > 1 else torch.zeros(()),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": (~sampled.rollout.finished).float().mean(),
        }
        for name, values in sampled.per_source.items():
            values = values.float()
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values)
            finite = values[~values.isnan()]
            metrics[f"rewards/{name}/std"] = finite.std() if finite.numel() > 1 else torch.zeros(())
        return {k: v.detach().float().cpu() for k, v in metrics.items()}

    def show_samples(self, loop, sampled: Sampled) -> None:
        """Every algo.sample_every steps: a table of a few completions, also appended to samples.jsonl."""
        cfg = self.cfg
        step = loop.progress.step + 1
        if not cfg.sample_every or step % cfg.sample_every or not loop.accelerator.is_main_process:
            return
        from alignctl.tracking import log_samples

        shown = list(zip(sampled.prompts, sampled.completions, sampled.total.tolist()))[: cfg.num_samples_shown]
        log_samples(loop.run_dir, step, shown, loop.tracker)

    # ------------------------------------------------------------------ log-probs and updates
    @torch.no_grad()
    def policy_logps(self, loop, rollout: Rollout, size: int) -> torch.Tensor:
        """``[N, R]`` log-probs of the sampled tokens under the current policy (no grad, eval mode)."""
        model, accelerator = loop.model, loop.accelerator
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(rollout), size):
                part = rollout.select(torch.arange(start, min(start + size, len(rollout))))
                with accelerator.autocast():
                    parts.append(model(part)["logprobs"].float())
        finally:
            model.train(was_training)
        return torch.cat(parts)

    @torch.no_grad()
    def reference_logps(self, loop, rollout: Rollout, size: int) -> torch.Tensor:
        """``[N, R]`` reference log-probs (frozen copy, or the policy with its adapter off)."""
        from alignctl.models.value_head import reference_logps

        job = loop.job
        parts = []
        for start in range(0, len(rollout), size):
            part = rollout.select(torch.arange(start, min(start + size, len(rollout))))
            with loop.accelerator.autocast():
                parts.append(reference_logps(self.reference, part, temperature=self.generation.temperature,
                                             chunk_size=job.train.logps_chunk_size).float())
        return torch.cat(parts)

    def optimize(self, loop, part: Rollout, compute) -> Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Forward/backward one mini-batch with ``compute(part) -> (loss, stats)``; the optimizer
        steps every algo.gradient_accumulation_steps calls. None when the loss was not finite and
        the batch was skipped (train.skip_nonfinite)."""
        from alignctl.engine.guards import loss_is_finite

        accelerator, model = loop.accelerator, loop.model
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, stats = compute(part)
            if not loss_is_finite(loss, accelerator):
                loop.handle_nonfinite(loss, part.row_index.tolist())
                return None
            accelerator.backward(loss)
            max_norm = loop.tcfg.max_grad_norm
            if accelerator.sync_gradients and max_norm > 0:
                loop.window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), stats

    def optimize_parts(self, loop, parts, compute, losses: List[torch.Tensor], stats: Dict[str, List[torch.Tensor]]) -> None:
        """``optimize`` each mini-batch of ``parts``, collecting the losses and stats of those that ran."""
        for part in parts:
            done = self.optimize(loop, part, compute)
            if done is None:
                continue
            losses.append(done[0])
            for key, value in done[1].items():
                stats.setdefault(key, []).append(value)

    # ------------------------------------------------------------------ saving and resume
    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.policy

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore algorithm state (called before or after set-up; kept until set-up when early)."""
        self._pending_state = state
        if hasattr(self, "loop"):
            self.restore(state)

    def restore(self, state: Dict[str, Any]) -> None:
        pass
