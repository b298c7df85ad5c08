"""Generations of an offline policy algorithm at each evaluation (``run.sample_prompts``).

A few prompts (by default 3 of the eval set, or of the training set when there is none; or the
user's own strings) are answered by the policy at every evaluation; the answers are shown in a
table and appended to samples.jsonl with the step (the same file and table the online algorithms
use). Decoding is greedy with ``generation.max_new_tokens`` unless the user changed the
``generation`` group, which is then used as set.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from alignctl.data.encode import IGNORE_INDEX
from alignctl.errors import ConfigError

DEFAULT_COUNT = 3


def policy_algorithms() -> List[str]:
    """Offline algorithms whose model is a policy that can answer a prompt (reward trains a scorer)."""
    from alignctl.registry import algorithms_where

    return algorithms_where(loop="offline", trains="policy")


def check_sample_prompts(job: Any) -> None:
    """run.sample_prompts: null, an integer >= 0 or a list of non-empty strings; refused (not
    ignored) for algorithms that do not generate this way."""
    value = job.run.sample_prompts
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise ConfigError(
            f"run.sample_prompts={value!r}: use a count (run.sample_prompts=3), a list of prompts "
            "(run.sample_prompts='[\"Hello\", \"2+2=\"]'), or 0 to turn samples off"
        )
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"run.sample_prompts={value}: must be >= 0 (0 turns samples off)")
    if not isinstance(value, int) and not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"run.sample_prompts={list(value)}: every prompt must be a non-empty string")
    if _enabled(value) and job.algo.name not in policy_algorithms():
        raise ConfigError(f"run.sample_prompts is for offline policy algorithms ({', '.join(policy_algorithms())}); "
                          f"{_instead(job.algo.name)}")


def _instead(name: str) -> str:
    if name == "reward":
        return "algo=reward trains a scorer, which generates nothing: drop run.sample_prompts"
    if name == "ddpo":
        return "algo=ddpo saves sample images itself: drop run.sample_prompts"
    return f"algo={name} shows samples every algo.sample_every steps (algo.num_samples_shown): drop run.sample_prompts"


def _enabled(value: Any) -> bool:
    return value is None or (value != 0 and len(value) > 0 if not isinstance(value, int) else value > 0)


def sampling_enabled(job: Any) -> bool:
    """Whether this job shows sample generations (and so reads the generation group)."""
    return job.algo.name in policy_algorithms() and _enabled(job.run.sample_prompts)


def generation_settings(job: Any):
    """The generation group as set; greedy decoding when the user left it at its defaults."""
    from omegaconf import OmegaConf

    from alignctl.config import GenerationConfig
    from alignctl.rollout.generate import GenerationSettings

    settings = GenerationSettings.from_config(job.generation)
    if job.generation == OmegaConf.structured(GenerationConfig):
        settings.do_sample = False
    return settings


def prompt_ids_of(example: Any) -> List[int]:
    """The prompt of a prepared example: its prompt ids (pairs, KTO), or for SFT the tokens before
    the first trained one; text-only rows (every token trained) give their first half."""
    if getattr(example, "prompt_ids", None) is not None:
        return list(example.prompt_ids)
    ids, labels = list(example.input_ids), list(example.labels)
    starts = getattr(example, "starts", [0])
    end = starts[1] if len(starts) > 1 else len(ids)  # a packed row: its first example only
    ids, labels = ids[:end], labels[:end]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    return ids[:first] if first >= 2 else ids[: max(1, len(ids) // 2)]


class SampleGenerations:
    """The prompts of a run and what generates and logs their answers."""

    def __init__(self, prompts: List[List[int]], tokenizer, settings, origin: str) -> None:
        self.prompts, self.tokenizer, self.settings, self.origin = prompts, tokenizer, settings, origin

    @classmethod
    def from_job(cls, job: Any, tokenizer, train: Sequence[Any], eval_data: Optional[Sequence[Any]]):
        """None when samples are off (or there is no prompt to take)."""
        from alignctl.data.encode import encode_prompt

        if not sampling_enabled(job):
            return None
        value = job.run.sample_prompts
        if value is not None and not isinstance(value, int):
            return cls([encode_prompt(tokenizer, text) for text in value], tokenizer, generation_settings(job),
                       "run.sample_prompts")
        count = DEFAULT_COUNT if value is None else int(value)
        source, name = (eval_data, "eval") if eval_data else (train, "training")
        prompts = [prompt_ids_of(example) for example in list(source)[:count]]
        return cls(prompts, tokenizer, generation_settings(job), f"the first {len(prompts)} {name} prompts")

    def texts(self) -> List[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.prompts]

    def generate(self, model, accelerator) -> List[str]:
        """One answer per prompt (every process generates, as sharded weights need; the RNG state of
        training is left untouched)."""
        import torch

        from alignctl.rollout.generate import generate, left_pad

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids, mask = left_pad(self.prompts, pad)
        with torch.random.fork_rng(devices=[] if accelerator.device.type == "cpu" else [accelerator.device]):
            with accelerator.autocast():
                return generate(model, self.tokenizer, ids, mask, self.settings).texts

    def show(self, loop) -> None:
        """Generate with the loop's policy, then table + samples.jsonl (main process)."""
        from alignctl.tracking import log_samples

        policy = loop.algorithm.unwrap_for_save(loop.accelerator.unwrap_model(loop.model))
        answers = self.generate(policy, loop.accelerator)
        if loop.accelerator.is_main_process:
            step = loop.progress.step
            rows = [(prompt, answer, None) for prompt, answer in zip(self.texts(), answers)]
            log_samples(loop.run_dir, step, rows, loop.tracker, title=f"samples @ step {step} ({self.origin})")
