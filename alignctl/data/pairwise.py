"""Pairwise preference data (DPO, reward model, CPO, ORPO; KTO by conversion).

Layouts (detected from the columns of the first row, after ``dataset.columns`` renames):

- ``prompt`` + ``chosen`` + ``rejected`` as strings: the answers follow the prompt directly, so
  by TRL's convention the prompt ends without a space and the answers begin with one;
- the same three as message lists (conversational): ``prompt`` is the conversation so far,
  ``chosen`` / ``rejected`` the assistant message(s) that follow; rendered with the chat template;
- ``chosen`` + ``rejected`` alone (implicit prompt, e.g. raw HH-RLHF): the prompt is their shared
  start, see :func:`extract_shared_prompt`; also when ``chosen`` / ``rejected`` are whole
  conversations beside a string ``prompt`` (UltraFeedback binarized), whose turn they already hold;
- an optional numeric ``margin`` column (reward model: Llama 2's margin) is kept per pair.

Tokenization follows the project rule (``encode.py``): the prompt is tokenized once and the same
ids precede both answers, so the chosen and rejected sequences never disagree on prompt tokens.
Truncation follows TRL's ``DPOTrainer.tokenize_row`` (0.9-0.11), see :func:`truncate_pair`, or
with ``truncation="joined"`` TRL 1.x's collator, see :func:`truncate_joined`. A text prompt gets the
tokenizer's BOS in front (TRL <= 0.11) unless ``add_bos_to_prompt=False`` (TRL 1.x); chat prompts
get whatever their template writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from alignctl.data.collate import pad_right
from alignctl.data.encode import (
    IGNORE_INDEX,
    Messages,
    encode_completion,
    encode_prompt,
    render_chat_completion,
    truncate,
)
from alignctl.data.load import Row, encode_each, names_file, require_messages
from alignctl.errors import ConfigError, DataError

TRUNCATION_MODES = ("keep_end", "keep_start")
TRUNCATIONS = ("answers", "joined")
EXPLICIT = "prompt_chosen_rejected"
IMPLICIT = "chosen_rejected"
CHAT_SUFFIX = "_chat"
REMAP_HINT = (
    "preference data needs 'prompt' + 'chosen' + 'rejected', or 'chosen' + 'rejected' whose shared "
    "start is the prompt; map your columns with dataset.columns, e.g. dataset.columns.{field}=<your column>"
)

Text = Union[str, Messages]


# --------------------------------------------------------------------------- prompt extraction


def extract_shared_prompt(chosen: Text, rejected: Text) -> Tuple[Text, Text, Text]:
    """Split an implicit-prompt pair into ``(prompt, chosen_rest, rejected_rest)``, as TRL's ``extract_prompt``.

    Strings: the prompt is the longest common character prefix; when the character just before
    the split point is a space, that space goes to the answers (``"Q: hi A: yes"`` / ``"Q: hi A: no"``
    -> ``("Q: hi A:", " yes", " no")``). Message lists: the common leading messages are the prompt.

    Where TRL's loop has quirks we do the plain thing instead: when one side is a prefix of the
    other (or both are equal) TRL leaves the last shared element in both answers; here the split is
    the true common prefix, so the shorter answer comes back empty (callers report it). When the
    first elements already differ, TRL looks at ``chosen[-1]`` (the last character); here the
    prompt is simply empty.
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise TypeError("chosen and rejected must both be strings or both be message lists")
    split = 0
    limit = min(len(chosen), len(rejected))
    while split < limit and chosen[split] == rejected[split]:
        split += 1
    if isinstance(chosen, str) and 0 < split < limit and chosen[split - 1] == " ":
        split -= 1
    return chosen[:split], chosen[split:], rejected[split:]


# --------------------------------------------------------------------------- examples


@dataclass
class PairExample:
    """One tokenized preference pair; the prompt ids are shared by both sequences."""

    prompt_ids: List[int]
    chosen_ids: List[int]  # answer only, EOS appended (plain text) or the template's end tags (chat)
    rejected_ids: List[int]
    row_index: int = -1
    margin: Optional[float] = None

    @property
    def chosen_input_ids(self) -> List[int]:
        return self.prompt_ids + self.chosen_ids

    @property
    def rejected_input_ids(self) -> List[int]:
        return self.prompt_ids + self.rejected_ids

    @property
    def chosen_labels(self) -> List[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.chosen_ids)

    @property
    def rejected_labels(self) -> List[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.rejected_ids)

    def sequence(self, which: str) -> Tuple[List[int], List[int]]:
        """``(input_ids, labels)`` of ``which`` = "chosen" or "rejected"; prompt labels masked."""
        if which == "chosen":
            return self.chosen_input_ids, self.chosen_labels
        if which == "rejected":
            return self.rejected_input_ids, self.rejected_labels
        raise ValueError(f"which={which!r}: use 'chosen' or 'rejected'")


@dataclass
class PairData:
    examples: List[PairExample]
    skipped: int  # rows dropped because skip_invalid was set
    format: str  # prompt_chosen_rejected / chosen_rejected, with "_chat" for message lists


def detect_pair_format(rows: Sequence[Row]) -> str:
    """Layout of the data set from its first row: explicit/implicit prompt, text or chat."""
    if not rows:
        raise DataError("preference data set has no rows")
    first = rows[0]
    columns = list(first.data)
    for needed in ("chosen", "rejected"):
        if needed not in first.data:
            raise DataError(
                f"row {first.index}: missing column '{needed}' (columns: {', '.join(columns) or 'none'}); "
                + REMAP_HINT.format(field=needed)
            )
    chat = any(isinstance(first.data.get(k), list) for k in ("prompt", "chosen", "rejected"))
    if chat and isinstance(first.data.get("prompt"), str) and not isinstance(first.data.get("chosen"), str):
        # A string prompt beside whole conversations (UltraFeedback binarized): the conversations
        # already hold the prompt turn, so it is their shared start, as TRL's maybe_extract_prompt does.
        return IMPLICIT + CHAT_SUFFIX
    return (EXPLICIT if "prompt" in first.data else IMPLICIT) + (CHAT_SUFFIX if chat else "")


@names_file
def build_pair_examples(
    rows: Sequence[Row],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
    add_bos_to_prompt: bool = True,
    truncation: str = "answers",
) -> PairData:
    """Validate, tokenize and truncate every pair (``truncation``: answers | joined, see the module).

    Invalid rows raise a DataError naming the row and the field, or are counted in
    ``PairData.skipped`` and dropped when ``skip_invalid``.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"algo.truncation={truncation!r}: use answers or joined")
    fmt = detect_pair_format(rows)
    with_margin = any("margin" in row.data for row in rows)

    def encode(row: Row) -> PairExample:
        example = _encode_row(row, fmt, tokenizer, add_eos, add_bos_to_prompt)
        example.margin = _margin(row) if with_margin else None
        if truncation == "joined":
            return truncate_joined(example, max_length)
        return truncate_pair(example, max_length, max_prompt_length, truncation_mode, bos_token_id=tokenizer.bos_token_id)

    examples, skipped = encode_each(rows, encode, skip_invalid)
    if not examples:
        raise DataError(f"no usable preference pairs left ({skipped} rows were skipped as invalid)")
    return PairData(examples=examples, skipped=skipped, format=fmt)


def truncate_pair(
    example: PairExample,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    *,
    bos_token_id: Optional[int] = None,
) -> PairExample:
    """TRL ``tokenize_row`` truncation (0.9-0.11), in place; returns the example.

    With L = the longer answer: if prompt + L > max_length, the prompt is cut to
    ``max_prompt_length`` (keep_end keeps its end, keep_start its start); if still too long, both
    answers keep their first ``max_length - max_prompt_length`` tokens (so the EOS may go).
    Unlike TRL, keep_end keeps a leading BOS (the prompt keeps BOS + its last tokens).
    """
    longer = max(len(example.chosen_ids), len(example.rejected_ids))
    prompt = example.prompt_ids
    if len(prompt) + longer > max_length:
        keeps_bos = bos_token_id is not None and bool(prompt) and prompt[0] == bos_token_id
        if truncation_mode == "keep_end" and keeps_bos and max_prompt_length > 1:
            prompt = prompt[:1] + truncate(prompt[1:], max_prompt_length - 1, "keep_end")
        else:
            prompt = truncate(prompt, max_prompt_length, truncation_mode)
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length
        example.chosen_ids = example.chosen_ids[:keep]
        example.rejected_ids = example.rejected_ids[:keep]
    example.prompt_ids = prompt
    _check_trainable(example)
    return example


def truncate_joined(example: PairExample, max_length: int) -> PairExample:
    """TRL 1.x truncation, in place: each of prompt + chosen and prompt + rejected keeps its first
    ``max_length`` tokens (so only answers lose tokens). A prompt that alone fills ``max_length``
    leaves nothing to train: TRL drops such rows; here it is an error (or skipped, skip_invalid)."""
    if len(example.prompt_ids) >= max_length:
        raise DataError(
            f"row {example.row_index}: the prompt alone has {len(example.prompt_ids)} tokens, >= algo.max_length="
            f"{max_length}, so algo.truncation=joined leaves no answer token; raise algo.max_length, use "
            "algo.truncation=answers (cuts the prompt first) or dataset.skip_invalid=true"
        )
    keep = max_length - len(example.prompt_ids)
    example.chosen_ids = example.chosen_ids[:keep]
    example.rejected_ids = example.rejected_ids[:keep]
    _check_trainable(example)
    return example


def _check_trainable(example: PairExample) -> None:
    # The first position is never predicted, so with no prompt an answer needs 2 tokens.
    if not example.prompt_ids and min(len(example.chosen_ids), len(example.rejected_ids)) < 2:
        raise DataError(
            f"row {example.row_index}: an answer has no trained token (empty prompt and a one-token answer); "
            "give a prompt or a longer answer"
        )


def _check_lengths(max_length: int, max_prompt_length: int, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"algo.truncation_mode={truncation_mode!r}: use keep_end or keep_start")
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise ConfigError(
            f"algo.max_prompt_length={max_prompt_length}, algo.max_length={max_length}: need "
            "1 <= max_prompt_length < max_length (answers get max_length - max_prompt_length tokens "
            "when a pair is too long)"
        )


# --------------------------------------------------------------------------- one row


def _encode_row(row: Row, fmt: str, tokenizer, add_eos: bool, add_bos: bool = True) -> PairExample:
    chat = fmt.endswith(CHAT_SUFFIX)
    chosen = _field(row, "chosen", chat)
    rejected = _field(row, "rejected", chat)
    if chosen == rejected:
        raise DataError(f"row {row.index}: columns 'chosen' and 'rejected' are identical, so there is no preference")
    if fmt.startswith(EXPLICIT):
        prompt = _field(row, "prompt", chat, allow_empty=not chat)
    else:
        prompt, chosen, rejected = extract_shared_prompt(chosen, rejected)
        if chat and not prompt:
            raise DataError(
                f"row {row.index}: 'chosen' and 'rejected' share no leading message, so there is no prompt; "
                "give a 'prompt' column or make both conversations start with the same turns"
            )
        where = " once the shared prompt is removed"
        for name, rest, other in (("chosen", chosen, "rejected"), ("rejected", rejected, "chosen")):
            if _is_empty(rest):
                raise DataError(
                    f"row {row.index}: the '{name}' answer is empty{where} ('{name}' is the start of '{other}')"
                )
    if chat:
        return _encode_chat(row, tokenizer, prompt, chosen, rejected)
    prompt_ids = encode_prompt(tokenizer, prompt) if add_bos else tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return PairExample(
        prompt_ids=prompt_ids,
        chosen_ids=encode_completion(tokenizer, chosen, add_eos),
        rejected_ids=encode_completion(tokenizer, rejected, add_eos),
        row_index=row.index,
    )


def _encode_chat(row: Row, tokenizer, prompt: Messages, chosen: Messages, rejected: Messages) -> PairExample:
    # Like SFT's conversational path: the template supplies any BOS and the end-of-turn tags.
    prompt_text, chosen_text = render_chat_completion(tokenizer, prompt, chosen, row.index)
    _, rejected_text = render_chat_completion(tokenizer, prompt, rejected, row.index)
    if chosen_text == rejected_text:
        raise DataError(f"row {row.index}: 'chosen' and 'rejected' render to the same text, so there is no preference")

    def ids(text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return PairExample(ids(prompt_text), ids(chosen_text), ids(rejected_text), row_index=row.index)


def _field(row: Row, name: str, chat: bool, allow_empty: bool = False) -> Text:
    if name not in row.data:
        raise DataError(
            f"row {row.index}: missing column '{name}' (columns: {', '.join(row.data) or 'none'}); "
            + REMAP_HINT.format(field=name)
        )
    value = row.data[name]
    if value is None:
        raise DataError(f"row {row.index}: column '{name}' is empty (null)")
    if chat:
        if isinstance(value, str):
            raise DataError(
                f"row {row.index}: column '{name}' is a string, but this data set is conversational "
                "(its first row holds message lists); use message lists in every row"
            )
        messages = require_messages(row, name)
        if not allow_empty and _is_empty(messages):
            raise DataError(f"row {row.index}: column '{name}' is empty (every message has empty content)")
        return messages
    if not isinstance(value, str):
        raise DataError(
            f"row {row.index}: column '{name}' must be a string like the first row's, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"row {row.index}: column '{name}' is empty")
    return value


def _is_empty(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in value)


def _margin(row: Row) -> float:
    if "margin" not in row.data or row.data["margin"] is None:
        raise DataError(f"row {row.index}: column 'margin' is missing here but set in other rows; give every row a margin")
    value = row.data["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"row {row.index}: column 'margin' must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- batches


def collate_pairs(examples: Sequence[PairExample], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """One concatenated batch for a single forward pass (TRL's ``concatenated_inputs``).

    Rows ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, each prompt + answer,
    right padded to the longest of all 2B. ``labels`` mask the prompt and the padding with
    IGNORE_INDEX. ``row_index`` [B]; ``margin`` [B] (float) only when every pair has one;
    ``seq_lengths`` [2B].
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    ids = [e.chosen_input_ids for e in examples] + [e.rejected_input_ids for e in examples]
    labels = [e.chosen_labels for e in examples] + [e.rejected_labels for e in examples]
    batch = {
        "input_ids": pad_right(ids, pad_token_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right(labels, IGNORE_INDEX),
        "row_index": torch.tensor([e.row_index for e in examples], dtype=torch.long),
        "seq_lengths": torch.tensor([len(s) for s in ids], dtype=torch.long),
    }
    margins = [e.margin for e in examples]
    if all(m is not None for m in margins):
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    elif any(m is not None for m in margins):
        raise ValueError("collate_pairs: some pairs have a margin and some do not")
    return batch


__all__ = [
    "PairData",
    "PairExample",
    "build_pair_examples",
    "collate_pairs",
    "detect_pair_format",
    "extract_shared_prompt",
    "truncate_joined",
    "truncate_pair",
]
