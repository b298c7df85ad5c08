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


# --------------------------------------------------------------------------- verifiable answers
# For data sets with an integer ``answer`` column, e.g. ``dataset=arithmetic``
# (alignctl/data/make_arithmetic.py) with ``reward=arithmetic``.

import re  # noqa: E402  (appended section)

__all__ += ["arithmetic_correct", "answer_format"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# An optional sign, then digits, either plain or with commas between groups of three ("12,345").
_INTEGER = re.compile(r"[+-]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)")


def _completion_text(completion: Any) -> str:
    """A completion as text: a string as is; a message list (TRL's conversational completions) -> the
    last message's content; a single message dict -> its content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        completion = completion[-1]
    if isinstance(completion, dict):
        content = completion.get("content")
        if content is None:
            return ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return str(content)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _parse_integer(text: str) -> Optional[int]:
    """``text`` as an integer, tolerating surrounding spaces, a leading ``+`` and thousands commas; else None."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return None
    return int(re.sub(r"[\s,]", "", text))


def _expected_integer(value: Any, row: int) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"row {row}: column 'answer' is {value!r}; it must hold the integer answer (e.g. \"12\")")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    parsed = _parse_integer(value) if isinstance(value, str) else None
    if parsed is None:
        raise ValueError(f"row {row}: column 'answer' is {value!r}, not an integer")
    return parsed


def arithmetic_correct(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Optional[Sequence[Any]] = None,
    **kwargs: Any,
) -> List[float]:
    """1.0 when the first ``<answer>...</answer>`` of the completion holds the row's integer answer, else 0.0.

    Strict: the tag's content must be one integer, with surrounding spaces, a leading ``+`` (or
    ``-``) and commas as thousands separators tolerated (``<answer> 1,234 </answer>`` matches 1234).
    No tag, an unclosed tag, or anything else inside it (``12 apples``, ``12.0``, ``1,23``) gives 0.0;
    there is no fallback to numbers outside the tags. ``answer`` is the data set's column (the integer
    as a string, or an int); without it this raises a ValueError. Completions may be strings or message
    lists (the last message's content is read).
    """
    if answer is None:
        raise ValueError(
            "arithmetic_correct needs an 'answer' column with each row's integer answer (the data set has none; "
            "rename yours with dataset.columns.answer=<your column>)"
        )
    if len(answer) != len(completions):
        raise ValueError(f"column 'answer' has {len(answer)} values for {len(completions)} completions")
    rewards = []
    for i, completion in enumerate(completions):
        expected = _expected_integer(answer[i], i)
        match = _ANSWER_TAG.search(_completion_text(completion))
        got = _parse_integer(match.group(1)) if match else None
        rewards.append(1.0 if got is not None and got == expected else 0.0)
    return rewards


def answer_format(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> List[float]:
    """How well a completion follows the ``<answer>NUMBER</answer>`` format (correctness not checked).

    1.0: exactly one ``<answer>`` and one ``</answer>``, in that order, with one integer inside
    (as :func:`arithmetic_correct` reads it); 0.5: at least one closed ``<answer>...</answer>`` but
    not that (not an integer inside, or several tags); 0.0: no closed tag. Completions may be
    strings or message lists (the last message's content is read).
    """
    rewards = []
    for completion in completions:
        text = _completion_text(completion)
        tags = _ANSWER_TAG.findall(text)
        if not tags:
            rewards.append(0.0)
        elif (
            len(tags) == 1
            and text.count("<answer>") == 1
            and text.count("</answer>") == 1
            and _parse_integer(tags[0]) is not None
        ):
            rewards.append(1.0)
        else:
            rewards.append(0.5)
    return rewards
