"""Reward sources for online RL: Python reward functions, a trained reward model, and their weighted sum.

Reward functions follow TRL's GRPO convention, so functions written for TRL work unchanged::

    fn(prompts=[str], completions=[str], completion_ids=[[int]], **columns) -> list of B numbers

``columns`` are the data set's other columns (e.g. ``answer``, ``keywords``), each a list aligned
with the batch; accept ``**kwargs`` to ignore the ones you do not use. An entry may be ``None``
("not applicable to this completion"): it becomes NaN in the per-source rewards, and counts as 0
in the weighted total (TRL's nansum). A function is named ``"module:function"`` (dots after the
colon reach attributes, ``"module:Class.method"``); the current directory is importable, so
``my_rewards:score`` finds ``./my_rewards.py``.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from alignctl.errors import AlignctlError, ConfigError, ModelLoadError

__all__ = [
    "RESERVED_ARGUMENTS",
    "RewardModelScorer",
    "RewardResult",
    "RewardSources",
    "call_reward_function",
    "load_reward_function",
]

# Names reward functions receive as arguments; data set columns with these names are not forwarded.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids")
REWARD_MODEL = "reward_model"
EXAMPLE_FUNCTION = "alignctl.rl.reward_functions:length_target"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- reward functions


def load_reward_function(name: str) -> Callable[..., Any]:
    """Import ``"module:function"`` and return the callable; every failure is one clear AlignctlError."""
    module_name, sep, attr_path = name.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise ConfigError(f"reward.functions: {name!r} is not 'module:function' (e.g. {EXAMPLE_FUNCTION})")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while the module runs
        raise AlignctlError(
            f"reward function '{name}': cannot import module {module_name} ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AlignctlError(
                f"reward function '{name}': {getattr(obj, '__name__', module_name)} has no attribute '{part}'; "
                f"check the name after the colon"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise AlignctlError(f"reward function '{name}': {attr_path} is a {type(obj).__name__}, not a function")
    return obj


def call_reward_function(
    fn: Callable[..., Any],
    name: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    columns: Optional[Mapping[str, Sequence[Any]]] = None,
) -> torch.Tensor:
    """Call ``fn`` TRL-style and check what it returns: a [B] float32 tensor, NaN where it gave None."""
    kwargs = {k: list(v) for k, v in (columns or {}).items() if k not in RESERVED_ARGUMENTS}
    try:
        out = fn(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids), **kwargs)
    except Exception as exc:
        raise AlignctlError(f"reward function '{name}' raised {type(exc).__name__}: {_first_line(exc)}") from exc
    values = _as_list(out, name)
    if len(values) != len(completions):
        raise AlignctlError(
            f"reward function '{name}' returned {len(values)} rewards for {len(completions)} completions; "
            "return one number (or None) per completion"
        )
    return torch.tensor([_as_reward(v, name, i) for i, v in enumerate(values)], dtype=torch.float32)


def _as_list(out: Any, name: str) -> list:
    if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
        if getattr(out, "ndim", 0) != 1:
            raise AlignctlError(
                f"reward function '{name}' returned an array of shape {tuple(out.shape)}; return a 1-D list of numbers"
            )
        return out.tolist() if not isinstance(out, torch.Tensor) else out.detach().cpu().tolist()
    if isinstance(out, (list, tuple)):
        return list(out)
    raise AlignctlError(f"reward function '{name}' returned a {type(out).__name__}; return a list of numbers")


def _as_reward(value: Any, name: str, index: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):  # bools and numpy scalars are Real too
        raise AlignctlError(
            f"reward function '{name}': reward {index} is {value!r} ({type(value).__name__}), not a number or None"
        )
    value = float(value)
    if math.isinf(value):
        raise AlignctlError(f"reward function '{name}': reward {index} is {value}; rewards must be finite (or None)")
    return value


# --------------------------------------------------------------------------- reward model


class RewardModelScorer:
    """A trained reward model (one-output sequence classifier) that scores prompt + completion texts.

    ``path`` is a run directory of ``alignctl train algo=reward`` (its ``final_model/`` is used, or
    ``final_model/merged`` after LoRA with ``peft.merge_on_save=true``) or a model folder. The
    model's own tokenizer is used. A text is tokenized the way the repo trained it: prompt with
    BOS (if the tokenizer has one), then the completion with EOS appended; texts longer than
    ``max_length`` tokens keep their first ``max_length``. The model is in eval mode and frozen.
    """

    def __init__(
        self,
        path: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"reward model: batch_size={batch_size}, max_length={max_length}: need >= 1 and >= 2")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = _model_folder(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(
                f"reward.model={path}: cannot load a sequence classifier from {folder} ({_first_line(exc)})"
            ) from None
        if model.config.num_labels != 1:
            raise ModelLoadError(
                f"reward.model={path}: the model has {model.config.num_labels} outputs (num_labels), a reward model "
                "has one; train one with `alignctl train algo=reward` and point reward.model at its run directory"
            )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_id  # how the classifier finds each row's last token
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.path = str(path)

    def encode(self, prompt: str, completion: str) -> List[int]:
        """Token ids of one scored text (see the class docstring)."""
        from alignctl.data.encode import encode_completion, encode_prompt

        ids = encode_prompt(self.tokenizer, prompt) + encode_completion(self.tokenizer, completion, add_eos=True)
        return ids[: self.max_length]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """[B] float32 rewards on the CPU (``logits[:, 0]``), in batches of ``batch_size``."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        from alignctl.data.collate import pad_right

        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            seqs = [self.encode(prompts[i], completions[i]) for i in chunk]
            ids = pad_right(seqs, self.pad_id).to(self.device)
            mask = pad_right([[1] * len(s) for s in seqs], 0).to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def _model_folder(path: Union[str, Path]) -> Path:
    """The folder with the reward model's config.json inside a run directory or model folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"reward.model={path}: no such directory; point it at a reward-model run directory "
            "(from `alignctl train algo=reward`) or a saved model folder"
        )
    candidates = [root / "final_model", root / "final_model" / "merged", root, root / "merged"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    if any((folder / "adapter_config.json").is_file() for folder in candidates):
        raise ConfigError(
            f"reward.model={path}: holds a LoRA adapter only; merge it into its base first with "
            f"`alignctl merge {path}` (it writes final_model/merged, which is then used)"
        )
    raise ConfigError(
        f"reward.model={path}: no config.json there or in its final_model/; point it at a reward-model run "
        "directory (from `alignctl train algo=reward`) or a saved model folder"
    )


# --------------------------------------------------------------------------- all sources


@dataclass
class RewardResult:
    """``total`` [B]: weighted sum of the sources (NaN counts as 0); ``per_source``: name -> [B] (NaN kept)."""

    total: torch.Tensor
    per_source: Dict[str, torch.Tensor]


def _short_name(spec: Optional[str], fn: Callable[..., Any]) -> str:
    """``length_target`` for ``"pkg.mod:length_target"``; a callable's ``__name__``."""
    if spec:
        return spec.rpartition(":")[2].rpartition(".")[2]
    return getattr(fn, "__name__", type(fn).__name__)


class RewardSources:
    """The reward of a run: an optional reward model and any number of reward functions, weighted.

    Source order (for ``weights``): the reward model first, then the functions as listed. Per-source
    names: ``reward_model`` and each function's name (its full ``module:function`` when two share
    a name). ``functions`` entries are ``"module:function"`` strings or callables.
    """

    def __init__(
        self,
        functions: Sequence[Union[str, Callable[..., Any]]] = (),
        model_scorer: Optional[RewardModelScorer] = None,
        weights: Optional[Sequence[float]] = None,
    ) -> None:
        self.model_scorer = model_scorer
        self.functions: List[tuple] = []  # (name, callable)
        specs = list(functions or [])
        if model_scorer is None and not specs:
            raise ConfigError(
                "this algorithm needs a reward: set reward.model (a reward-model run directory) or "
                f"reward.functions, e.g. reward.functions=[{EXAMPLE_FUNCTION}]"
            )
        loaded = [(spec, load_reward_function(spec)) if isinstance(spec, str) else (None, spec) for spec in specs]
        names = [REWARD_MODEL] if model_scorer is not None else []
        shorts = [_short_name(spec, fn) for spec, fn in loaded]
        for (spec, fn), short in zip(loaded, shorts):
            base = short if shorts.count(short) == 1 and short != REWARD_MODEL else (spec or short)
            name, k = base, 2
            while name in names:  # the same function twice, or same-named callables
                name, k = f"{base}_{k}", k + 1
            names.append(name)
            self.functions.append((name, fn))
        self.names = names
        self.weights = self._check_weights(weights, names)

    @staticmethod
    def _check_weights(weights: Optional[Sequence[float]], names: List[str]) -> List[float]:
        if weights is None:
            return [1.0] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ConfigError(
                f"reward.weights has {len(weights)} values for {len(names)} reward sources ({', '.join(names)}); "
                "give one weight per source, the reward model first, then reward.functions in order"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ConfigError(f"reward.weights: {w!r} is not a finite number")
        return [float(w) for w in weights]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Optional[Mapping[str, Sequence[Any]]] = None,
        model_prompts: Optional[Sequence[str]] = None,
    ) -> RewardResult:
        """Score a batch of B completions; ``columns`` are the data set's other columns (lists of B).

        ``model_prompts``: the prompts as the policy saw them (after truncation), for the reward
        model; the functions get ``prompts`` (the data set's text), as in the reference library."""
        B = len(completions)
        if len(prompts) != B or len(completion_ids) != B:
            raise ValueError(f"rewards: {len(prompts)} prompts, {B} completions, {len(completion_ids)} completion_ids")
        for key, values in (columns or {}).items():
            if len(values) != B:
                raise ValueError(f"rewards: column {key!r} has {len(values)} values for {B} completions")
        per_source: Dict[str, torch.Tensor] = {}
        if self.model_scorer is not None:
            scored = model_prompts if model_prompts is not None else prompts
            per_source[REWARD_MODEL] = self.model_scorer.score(scored, completions).float().cpu()
        for name, fn in self.functions:
            per_source[name] = call_reward_function(fn, name, prompts, completions, completion_ids, columns)
        total = torch.zeros(B, dtype=torch.float32)
        for weight, name in zip(self.weights, self.names):
            total += weight * torch.nan_to_num(per_source[name], nan=0.0)
        return RewardResult(total=total, per_source=per_source)
