"""SFT data: rows in any supported format -> token ids and labels, optionally packed.

Formats (detected from the columns, after ``dataset.columns`` renames):
- ``messages``: a conversation, rendered with the chat template;
- ``prompt`` + ``completion``: strings, or message lists (conversational prompt/completion);
- ``text``: plain text, every token trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from alignctl.algo_configs import SFTConfig
from alignctl.data.encode import (
    IGNORE_INDEX,
    Encoded,
    encode_completion,
    encode_conversation,
    encode_prompt,
    render_chat_completion,
    truncate,
)
from alignctl.data.load import Row, encode_each, names_file, require_messages, require_text
from alignctl.errors import DataError

FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


@dataclass
class SFTExample(Encoded):
    row_index: int = -1
    # Packed rows: start offset of each example inside input_ids (position ids restart there).
    starts: List[int] = field(default_factory=lambda: [0])


@dataclass
class SFTData:
    examples: List[SFTExample]
    format: str
    skipped: int  # rows dropped because dataset.skip_invalid was set


def detect_format(rows: List[Row]) -> str:
    columns = set(rows[0].data)
    for name, needed in FORMATS.items():
        if set(needed) <= columns:
            return name
    raise DataError(
        f"row {rows[0].index}: cannot tell the SFT format from columns {sorted(columns)}; expected "
        "'messages', 'prompt' + 'completion', or 'text' (rename yours with dataset.columns, "
        "e.g. dataset.columns.prompt=question)"
    )


@names_file
def build_sft_examples(rows: List[Row], tokenizer, cfg: SFTConfig, skip_invalid: bool) -> SFTData:
    """Tokenize, mask and truncate every row; pack when ``cfg.packing``."""
    fmt = detect_format(rows)
    examples, skipped = encode_each(rows, lambda row: _encode_row(row, fmt, tokenizer, cfg), skip_invalid)
    if not examples:
        raise DataError("no usable rows left (all were skipped as invalid)")
    if cfg.packing:
        examples = pack_examples(examples, cfg.max_length)
    return SFTData(examples=examples, format=fmt, skipped=skipped)


def _encode_row(row: Row, fmt: str, tokenizer, cfg: SFTConfig) -> SFTExample:
    if fmt == "messages":
        messages = require_messages(row, "messages")
        if cfg.assistant_only_loss and not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"row {row.index}: conversation has no assistant turn to train on")
        for turn, message in enumerate(messages):
            if message["role"] == "assistant" and not message["content"].strip():
                raise DataError(f"row {row.index}: messages[{turn}] is an empty assistant turn")
        encoded = encode_conversation(tokenizer, messages, cfg.assistant_only_loss, row.index)
    elif fmt == "prompt_completion":
        encoded = _encode_prompt_completion(row, tokenizer, cfg)
    else:
        ids = encode_completion(tokenizer, require_text(row, "text"), cfg.add_eos)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        encoded = Encoded(ids, list(ids))
    ids = truncate(encoded.input_ids, cfg.max_length, cfg.truncation_mode)
    labels = truncate(encoded.labels, cfg.max_length, cfg.truncation_mode)
    # The first token is never predicted (nothing precedes it), so it cannot carry the loss alone.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(
            f"row {row.index}: no trained tokens left after truncation to algo.max_length={cfg.max_length} "
            f"(example is {len(encoded.input_ids)} tokens); raise algo.max_length or set "
            "algo.truncation_mode=keep_end"
        )
    return SFTExample(input_ids=ids, labels=labels, row_index=row.index)


def _encode_prompt_completion(row: Row, tokenizer, cfg: SFTConfig) -> Encoded:
    prompt, completion = row.data.get("prompt"), row.data.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt_msgs = require_messages(row, "prompt")
        completion_msgs = require_messages(row, "completion")
        if not any(m["content"].strip() for m in completion_msgs):
            raise DataError(f"row {row.index}: column 'completion' is empty")
        prompt_text, completion_text = render_chat_completion(tokenizer, prompt_msgs, completion_msgs, row.index)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = encode_prompt(tokenizer, require_text(row, "prompt", allow_empty=True))
        completion_ids = encode_completion(tokenizer, require_text(row, "completion"), cfg.add_eos)
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if cfg.completion_only_loss else list(prompt_ids)
    return Encoded(prompt_ids + completion_ids, prompt_labels + list(completion_ids))


def pack_examples(examples: List[SFTExample], max_length: int) -> List[SFTExample]:
    """First-fit-decreasing bin packing into rows of at most ``max_length`` tokens.

    Examples stay whole; each packed row remembers where its examples start so position ids
    restart there and attention does not cross examples. The first label of every example is
    masked: in a packed row it would otherwise be predicted from the previous example.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: List[List[int]] = []
    space: List[int] = []
    for i in order:
        length = len(examples[i].input_ids)
        target: Optional[int] = next((b for b, free in enumerate(space) if free >= length), None)
        if target is None:
            bins.append([i])
            space.append(max_length - length)
        else:
            bins[target].append(i)
            space[target] -= length
    packed = []
    for members in bins:
        ids: List[int] = []
        labels: List[int] = []
        starts: List[int] = []
        for i in sorted(members):
            starts.append(len(ids))
            ids.extend(examples[i].input_ids)
            labels.extend([IGNORE_INDEX] + examples[i].labels[1:])
        packed.append(SFTExample(input_ids=ids, labels=labels, row_index=examples[min(members)].row_index, starts=starts))
    return packed
