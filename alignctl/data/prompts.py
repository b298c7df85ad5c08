"""Prompt-only data for online RL (PPO, GRPO): rows -> prompt ids, the prompt text, other columns.

Layouts (from the first row's columns, after ``dataset.columns`` renames):

- ``prompt`` as a string: tokenized as is, with the tokenizer's BOS if it has one (no chat
  template, as TRL does for plain strings); reward functions see the string;
- ``prompt`` as a list of messages: rendered with the chat template and its generation prompt;
  reward functions see the rendered text;
- ``messages`` (a conversation): the prompt is the conversation without its trailing assistant
  message(s), rendered like a message-list prompt;
- ``chosen`` + ``rejected`` without a prompt (preference data such as raw HH-RLHF): the prompt is
  their shared start (:func:`alignctl.data.pairwise.extract_shared_prompt`). Strings: when that
  start contains ``"Assistant:"`` it is cut right after the last one, since HH-RLHF answers
  sometimes share their first words; message lists: trailing assistant messages are dropped.

Every other column of a row (``keywords``, ``target_length``, ``answer``, ...; ``chosen`` and
``rejected`` too) is kept in ``PromptExample.columns`` for the reward functions. Prompts longer
than ``max_prompt_length`` tokens are cut: ``keep_end`` keeps the last tokens (and a leading BOS,
as for preference pairs), ``keep_start`` the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from alignctl.data.encode import Messages, encode_prompt, render_chat_prompt, truncate
from alignctl.data.load import Row, encode_each, names_file, require_messages, require_text
from alignctl.data.pairwise import extract_shared_prompt
from alignctl.errors import ConfigError, DataError

__all__ = ["PromptData", "PromptExample", "build_prompt_examples", "collate_prompts", "detect_prompt_format"]

TRUNCATION_MODES = ("keep_end", "keep_start")
HINT = (
    "map your prompt column with dataset.columns.prompt=<your column>, or skip bad rows with dataset.skip_invalid=true"
)
ASSISTANT_TAG = "Assistant:"


@dataclass
class PromptExample:
    """One prompt: its token ids, its text as reward functions see it, the row's other columns."""

    prompt_ids: List[int]
    prompt_text: str
    columns: Dict[str, Any] = field(default_factory=dict)
    row_index: int = -1


@dataclass
class PromptData:
    examples: List[PromptExample]
    skipped: int  # rows dropped because skip_invalid was set
    format: str  # prompt, prompt_chat, messages, chosen_rejected, chosen_rejected_chat


def detect_prompt_format(rows: Sequence[Row]) -> str:
    """Layout of the data set from its first row."""
    if not rows:
        raise DataError("prompt data set has no rows")
    data = rows[0].data
    if "prompt" in data:
        return "prompt_chat" if isinstance(data["prompt"], list) else "prompt"
    if "messages" in data:
        return "messages"
    if "chosen" in data and "rejected" in data:
        chat = isinstance(data["chosen"], list) or isinstance(data["rejected"], list)
        return "chosen_rejected_chat" if chat else "chosen_rejected"
    raise DataError(
        f"row {rows[0].index}: no prompt column (columns: {', '.join(data) or 'none'}); online RL needs "
        "'prompt' (a string or messages), 'messages', or 'chosen' + 'rejected'; " + HINT
    )


@names_file
def build_prompt_examples(
    rows: Sequence[Row],
    tokenizer,
    *,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    skip_invalid: bool = False,
) -> PromptData:
    """Validate, render, tokenize and truncate every prompt.

    An unusable row raises a DataError naming the row and the column, or with ``skip_invalid`` is
    dropped and counted in ``PromptData.skipped``.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"algo.truncation_mode={truncation_mode!r}: use keep_end or keep_start")
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ConfigError(f"algo.max_prompt_length={max_prompt_length!r}: must be an integer >= 1")
    fmt = detect_prompt_format(rows)

    def encode(row: Row) -> PromptExample:
        text, ids, used = _encode_row(row, fmt, tokenizer)
        ids = _truncate(ids, max_prompt_length, truncation_mode, tokenizer.bos_token_id)
        columns = {k: v for k, v in row.data.items() if k not in used}
        return PromptExample(prompt_ids=ids, prompt_text=text, columns=columns, row_index=row.index)

    examples, skipped = encode_each(rows, encode, skip_invalid)
    if not examples:
        raise DataError(f"no usable prompts left ({skipped} rows were skipped as invalid)")
    return PromptData(examples=examples, skipped=skipped, format=fmt)


def collate_prompts(examples: Sequence[PromptExample], pad_token_id: int) -> Dict[str, Any]:
    """A generation batch: left-padded ``prompt_ids`` / ``prompt_mask`` [B, P], ``row_index`` [B],
    and the ``examples`` themselves (their text and columns feed the reward functions)."""
    if not examples:
        raise ValueError("collate_prompts needs at least one example")
    from alignctl.rollout.generate import left_pad  # imported here: rollout may import data modules

    ids, mask = left_pad([e.prompt_ids for e in examples], pad_token_id)
    return {
        "prompt_ids": ids,
        "prompt_mask": mask,
        "row_index": torch.tensor([e.row_index for e in examples], dtype=torch.long),
        "examples": list(examples),
    }


# --------------------------------------------------------------------------- one row


def _encode_row(row: Row, fmt: str, tokenizer):
    """(prompt text, prompt ids, the columns the prompt came from)."""
    if fmt.startswith("prompt"):
        value = row.data.get("prompt")
        if isinstance(value, list):
            text, ids = _chat(row, tokenizer, _messages(row, "prompt"))
        elif value is None or isinstance(value, str):
            text = _hinted(lambda: require_text(row, "prompt"))
            ids = encode_prompt(tokenizer, text)
        else:
            raise DataError(
                f"row {row.index}: column 'prompt' must be a string or a list of messages, "
                f"got {type(value).__name__}; {HINT}"
            )
        return text, ids, ("prompt",)
    if fmt == "messages":
        prompt = _without_trailing_assistant(_messages(row, "messages"))
        if not prompt:
            raise DataError(
                f"row {row.index}: column 'messages' has no turn before its assistant reply, so no prompt; {HINT}"
            )
        return (*_chat(row, tokenizer, prompt), ("messages",))
    return (*_shared_prompt(row, tokenizer), ())


def _shared_prompt(row: Row, tokenizer):
    chosen, rejected = row.data.get("chosen"), row.data.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _end_at_last_assistant(extract_shared_prompt(chosen, rejected)[0])
        if not prompt.strip():
            raise DataError(
                f"row {row.index}: 'chosen' and 'rejected' share no start, so there is no prompt; "
                "give a 'prompt' column (dataset.columns.prompt=<your column>) or set dataset.skip_invalid=true"
            )
        return prompt, encode_prompt(tokenizer, prompt)
    if isinstance(chosen, list) and isinstance(rejected, list):
        _messages(row, "chosen"), _messages(row, "rejected")
        prompt = _without_trailing_assistant(extract_shared_prompt(chosen, rejected)[0])
        if not prompt:
            raise DataError(
                f"row {row.index}: 'chosen' and 'rejected' share no leading message before the answers, so "
                "there is no prompt; give a 'prompt' column (dataset.columns.prompt=<your column>) or set "
                "dataset.skip_invalid=true"
            )
        return _chat(row, tokenizer, prompt)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise DataError(f"row {row.index}: column '{name}' is missing or null; {HINT}")
    raise DataError(
        f"row {row.index}: 'chosen' and 'rejected' must both be strings or both message lists, got "
        f"{type(chosen).__name__} and {type(rejected).__name__}"
    )


def _chat(row: Row, tokenizer, messages: Messages):
    text = render_chat_prompt(tokenizer, messages, row.index)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def _messages(row: Row, name: str) -> Messages:
    messages = _hinted(lambda: require_messages(row, name))
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"row {row.index}: column '{name}' is empty (every message has empty content); {HINT}")
    return messages


def _hinted(get):
    """Run a ``require_*`` check; its DataError gains the remap / skip hint."""
    try:
        return get()
    except DataError as exc:
        raise DataError(f"{exc}; {HINT}") from None


def _without_trailing_assistant(messages: Messages) -> Messages:
    end = len(messages)
    while end and messages[end - 1].get("role") == "assistant":
        end -= 1
    return list(messages[:end])


def _end_at_last_assistant(prefix: str) -> str:
    """HH-RLHF style: cut the shared start right after its last ``Assistant:`` (if it has one)."""
    at = prefix.rfind(ASSISTANT_TAG)
    return prefix[: at + len(ASSISTANT_TAG)] if at >= 0 else prefix


def _truncate(ids: List[int], max_length: int, mode: str, bos_token_id) -> List[int]:
    """keep_end keeps a leading BOS plus the last tokens (like preference pairs); keep_start the first."""
    if len(ids) <= max_length:
        return ids
    if mode == "keep_end" and bos_token_id is not None and ids[0] == bos_token_id and max_length > 1:
        return ids[:1] + truncate(ids[1:], max_length - 1, "keep_end")
    return truncate(ids, max_length, mode)
