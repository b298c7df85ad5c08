"""Batched generation for online RL, and the log-probs of what was sampled.

:func:`generate` samples responses to left-padded prompts with ``model.generate`` (KV cache on,
whatever the training config says) and cuts every response after its end: the first EOS token, or
the token that completes the first stop string. :func:`sampled_logprobs` scores those responses
under a model at the sampling temperature with the memory-lean log-prob path.

The sampling distribution is exactly what :class:`GenerationSettings` says: the model's own
``generation_config`` (a hub model may ship ``repetition_penalty``, ``top_k``, ...) is set aside
during the call, so nothing the policy's log-probs do not account for changes the samples. Only
its EOS ids are kept (added to the tokenizer's), since chat models often end turns with several.
Sampling draws from torch's global RNG: restoring the RNG state reproduces the samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from alignctl.errors import ConfigError
from alignctl.models.logps import IGNORE_INDEX, sequence_logps, unwrap_causal_lm

__all__ = [
    "GenerationSettings",
    "Generated",
    "cut_responses",
    "eos_token_ids",
    "generate",
    "left_pad",
    "sampled_logprobs",
]


@dataclass
class GenerationSettings:
    """How responses are sampled (``generation.*`` in a run's config)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is blocked until this many tokens were generated
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    do_sample: bool = True  # False = greedy (temperature/top_k/top_p unused)
    stop_strings: List[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg) -> "GenerationSettings":
        """Settings from an omegaconf node, a mapping or any object with these attributes.

        Missing fields keep their defaults; the result is validated.
        """
        values = {}
        for f in fields(cls):
            if isinstance(cfg, Mapping):
                present, value = f.name in cfg, cfg.get(f.name)
            else:
                sentinel = object()
                value = getattr(cfg, f.name, sentinel)
                present = value is not sentinel
            if present and value is not None:
                values[f.name] = value
        if "stop_strings" in values:
            stops = values["stop_strings"]
            values["stop_strings"] = [stops] if isinstance(stops, str) else list(stops)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> "GenerationSettings":
        """Raise ConfigError naming ``generation.<field>`` for a value generate cannot use."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"generation.{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"must not exceed generation.max_new_tokens={self.max_new_tokens}")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise bad("temperature", "must be > 0 (use generation.do_sample=false for greedy decoding)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 turns top-k off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 turns top-p off)")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "must be true or false")
        if not isinstance(self.stop_strings, list) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "must be a list of non-empty strings, e.g. generation.stop_strings=[END]")
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Generated:
    """Responses of one batch; row ``i`` answers prompt ``i``.

    ``response_ids`` [B, R] long: the kept tokens, then pad. ``response_mask`` [B, R] long: 1 on every
    kept token, including the EOS / the tokens completing a stop string. ``finished`` [B] bool: the
    response ended with EOS or a stop string (False: it hit ``max_new_tokens``). ``texts``: the
    responses decoded without special tokens, cut before the stop string.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: List[str]

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of kept tokens per response."""
        return self.response_mask.sum(-1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``(ids [B, P] long, mask [B, P] long)`` (generation pads on the left)."""
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def eos_token_ids(model, tokenizer) -> List[int]:
    """The tokenizer's EOS id, then any other EOS id of the model's generation config."""
    ids: List[int] = []
    candidates = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    for token in candidates:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and the model's generation config names none; set one")
    return ids


def cut_responses(
    response_ids: torch.Tensor,
    eos_ids: Sequence[int],
    pad_id: int,
    stop_ends: Optional[Sequence[Optional[int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End each row after its first EOS (inclusive) or at ``stop_ends[i]``, whichever comes first.

    ``stop_ends[i]`` is the number of tokens of row ``i`` up to and including the one that
    completes a stop string (None: no stop string). Returns ``(ids, mask, finished)``: ids with
    pad after the end, mask [B, R] long (1 on kept tokens), finished [B] bool (the row ended with
    EOS or a stop string). Works when ``pad_id`` is an EOS id: the first EOS is the end.
    """
    B, R = response_ids.shape
    device = response_ids.device
    is_eos = torch.isin(response_ids, torch.as_tensor(list(eos_ids), dtype=response_ids.dtype, device=device))
    has_eos = is_eos.any(-1)
    eos_end = torch.where(has_eos, is_eos.int().argmax(-1) + 1, torch.full_like(has_eos, R, dtype=torch.long))
    stop_end = torch.full((B,), R + 1, dtype=torch.long, device=device)  # R + 1 = no stop string
    if stop_ends is not None:
        for i, end in enumerate(stop_ends):
            if end is not None:
                stop_end[i] = int(end)
    end = torch.minimum(eos_end, stop_end).clamp(max=R)
    mask = torch.arange(R, device=device).unsqueeze(0) < end.unsqueeze(1)
    finished = (has_eos & (eos_end <= end)) | (stop_end <= end)
    ids = response_ids.masked_fill(~mask, pad_id)
    return ids, mask.long(), finished


def _stop_end(tokenizer, row: List[int], stops: Sequence[str]) -> Optional[int]:
    """Tokens of ``row`` up to the one completing the first stop string (None if none occurs).

    Only rows whose whole text holds a stop string pay for the search: a binary search over
    decoded prefixes ("the prefix contains a stop string" only turns true once).
    """

    def contains(k: int) -> bool:
        text = tokenizer.decode(row[:k], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not row or not contains(len(row)):
        return None
    lo, hi = 1, len(row)  # contains(hi) holds; find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cut_text(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


@contextmanager
def _sampling_mode(model) -> Iterator[None]:
    """Eval mode and no grad while generating; the training mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _own_generation_config(causal_lm, tokens: dict) -> Iterator[None]:
    """Set the model's generation config aside so none of its defaults reach the sampler."""
    from transformers import GenerationConfig

    saved = causal_lm.generation_config
    causal_lm.generation_config = GenerationConfig(**tokens)
    try:
        yield
    finally:
        causal_lm.generation_config = saved


def generate(
    model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: GenerationSettings
) -> Generated:
    """Sample one response per left-padded prompt (``prompt_ids``/``prompt_mask`` [B, P]).

    ``model`` is a transformers causal LM, or a peft model / :class:`CausalLMWithLogps` around one
    (unwrap DDP/FSDP first, e.g. ``accelerator.unwrap_model``). Returns tensors on the model's
    device. Stop strings are looked for in each response only: one that starts in the prompt and
    ends in the response stops transformers' generation but leaves the row unfinished here.
    """
    settings.validate()
    causal_lm = unwrap_causal_lm(model)
    device = causal_lm.device
    eos_ids = eos_token_ids(causal_lm, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    tokens = {"eos_token_id": eos_ids, "pad_token_id": pad_id, "bos_token_id": tokenizer.bos_token_id}
    options = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,  # training sets model.config.use_cache=False; generation wants the cache
        **tokens,
    )
    if settings.do_sample:
        options.update(temperature=float(settings.temperature), top_k=settings.top_k, top_p=float(settings.top_p))
    extra = {}
    if settings.stop_strings:
        options["stop_strings"] = list(settings.stop_strings)
        extra["tokenizer"] = tokenizer  # transformers needs it to match stop strings
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    with _sampling_mode(model), _own_generation_config(causal_lm, tokens):
        out = causal_lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=GenerationConfig(**options),
            **extra,
        )
    raw = out[:, prompt_ids.shape[1] :]
    stop_ends = None
    if settings.stop_strings:
        _, eos_mask, _ = cut_responses(raw, eos_ids, pad_id)  # search each row up to its EOS only
        rows = [r[: int(n)] for r, n in zip(raw.tolist(), eos_mask.sum(-1))]
        stop_ends = [_stop_end(tokenizer, row, settings.stop_strings) for row in rows]
    ids, mask, finished = cut_responses(raw, eos_ids, pad_id, stop_ends)
    width = max(int(mask.sum(-1).max()), 1)
    ids, mask = ids[:, :width], mask[:, :width]
    texts = [
        _cut_text(tokenizer.decode(row[: int(n)], skip_special_tokens=True), settings.stop_strings)
        for row, n in zip(ids.tolist(), mask.sum(-1))
    ]
    return Generated(response_ids=ids, response_mask=mask, finished=finished, texts=texts)


def sampled_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under ``model`` at the sampling temperature.

    ``log_softmax(logits / temperature)`` in fp32 over the full vocabulary (top-k/top-p are not
    applied), 0 where ``response_mask`` is 0. Differentiable when grad is enabled. Prompts are
    left-padded, so position ids are ``cumsum(mask) - 1`` (clamped at 0).
    """
    device = unwrap_causal_lm(model).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE_INDEX), response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)], dim=1
    )
    out = sequence_logps(
        model,
        input_ids,
        attention_mask,
        labels,
        position_ids=position_ids,
        chunk_size=chunk_size,
        temperature=temperature,
    )
    return out.per_token_logps()[:, prompt_ids.shape[1] :]
