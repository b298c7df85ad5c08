"""Text -> token ids, shared by every algorithm's data path.

The rule everywhere: a prompt is tokenized once and its ids are reused for every completion that
follows it (SFT's one, DPO's chosen and rejected), so two sequences of one example never disagree
on prompt tokens, even where the tokenizer would merge across the prompt/answer boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from alignctl.errors import DataError

IGNORE_INDEX = -100
Messages = List[Dict[str, str]]


@dataclass
class Encoded:
    """One training sequence: ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: List[int]
    labels: List[int]


def encode_prompt(tokenizer, prompt: str) -> List[int]:
    """Prompt text -> ids, with the tokenizer's BOS (if it has one) in front."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_completion(tokenizer, completion: str, add_eos: bool) -> List[int]:
    """Completion text -> ids (no BOS), EOS appended when asked and not already there."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def render_chat_prompt(tokenizer, messages: Messages, row_index: int) -> str:
    """Conversation so far, ending with the template's cue for the assistant to answer."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_chat_completion(tokenizer, prompt: Messages, completion: Messages, row_index: int) -> Tuple[str, str]:
    """(prompt text, completion text): the completion is what the template adds after the prompt."""
    prompt_text = render_chat_prompt(tokenizer, prompt, row_index)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"row {row_index}: the tokenizer's chat template renders the prompt differently when a "
            "completion follows, so prompt and completion cannot be split; use a template that is "
            "prefix-consistent (most are) or give plain-text prompt/completion columns"
        )
    return prompt_text, full_text[len(prompt_text) :]


def assistant_char_spans(tokenizer, messages: Messages, row_index: int) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (with its end tag)."""
    _require_template(tokenizer)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not (full_text.startswith(before) and full_text.startswith(through)):
            raise DataError(
                f"row {row_index}: the chat template is not prefix-consistent, so assistant turns "
                "cannot be located; set algo.assistant_only_loss=false to train on every token"
            )
        spans.append((len(before), len(through)))
    return full_text, spans


def encode_conversation(tokenizer, messages: Messages, assistant_only: bool, row_index: int) -> Encoded:
    """Tokenize a whole conversation; label assistant turns only when ``assistant_only``."""
    text, spans = assistant_char_spans(tokenizer, messages, row_index)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not assistant_only:
        return Encoded(ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[position] = ids[position]
    return Encoded(ids, labels)


def truncate(ids: Sequence[int], max_length: int, mode: str) -> List[int]:
    """Keep ``max_length`` tokens: keep_start drops the tail, keep_end drops the head."""
    if len(ids) <= max_length:
        return list(ids)
    if mode == "keep_start":
        return list(ids[:max_length])
    if mode == "keep_end":
        return list(ids[-max_length:])
    raise DataError(f"truncation_mode={mode!r}: use keep_start or keep_end")


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        error = DataError(
            "conversational data needs a tokenizer with a chat template, and this one has none; "
            "use a chat/instruct model, or give plain-text columns (text, or prompt + completion)"
        )
        error.every_row = True  # encode_each: not a bad row, so no skip_invalid advice and no skipping
        raise error
