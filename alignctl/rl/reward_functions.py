"""Rule-based reward functions shipped with alignctl (TRL's reward-function signature).

Use them as ``reward.functions=[alignctl.rl.reward_functions:length_target]``. Each takes the
batch's ``prompts`` and ``completions`` and, by name, the data set column it reads (a list aligned
with the batch); ``**kwargs`` swallows the other columns.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

DEFAULT_TARGET_LENGTH = 40
DEFAULT_KEYWORDS = ("thank", "please")

__all__ = ["length_target", "keyword"]


def length_target(
    prompts: Sequence[Any],
    completions: Sequence[str],
    target_length: Optional[Sequence[Any]] = None,
    **kwargs: Any,
) -> List[float]:
    """Reward completions whose length in characters is close to a target.

    ``reward = 1 - min(1, |len(completion) - target| / target)``: 1 at the target, falling
    linearly to 0 at 0 or 2 x target characters and beyond. ``target`` is the row's
    ``target_length`` column when the data set has one (and the row's value is not null), else 40.
    """
    rewards = []
    for i, completion in enumerate(completions):
        target = target_length[i] if target_length is not None else None
        target = DEFAULT_TARGET_LENGTH if target is None else target
        if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
            raise ValueError(f"row {i}: target_length must be a positive number, got {target!r}")
        rewards.append(1.0 - min(1.0, abs(len(completion) - target) / target))
    return rewards


def keyword(
    prompts: Sequence[Any],
    completions: Sequence[str],
    keywords: Optional[Sequence[Any]] = None,
    **kwargs: Any,
) -> List[float]:
    """1.0 when the completion contains any of the row's keywords (case-insensitive), else 0.0.

    ``keywords`` is a data set column: per row a list of strings or one comma-separated string.
    Without the column (or for a null entry) the keywords are ``["thank", "please"]``.
    """
    rewards = []
    for i, completion in enumerate(completions):
        words = _keywords(keywords[i] if keywords is not None else None, i)
        text = completion.lower()
        rewards.append(1.0 if any(w.lower() in text for w in words) else 0.0)
    return rewards


def _keywords(value: Any, row: int) -> List[str]:
    if value is None:
        return list(DEFAULT_KEYWORDS)
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"row {row}: keywords must be a list of strings or a comma-separated string, got {value!r}")
    return [w.strip() for w in value if w.strip()]
