"""Prompt-only data for online RL: every layout, truncation, errors naming rows, collation."""

from __future__ import annotations

import copy

import pytest
import torch

from alignctl.config import DatasetConfig
from alignctl.data.encode import encode_prompt
from alignctl.data.load import Row, load_rows
from alignctl.data.prompts import PromptExample, build_prompt_examples, collate_prompts
from alignctl.errors import ConfigError, DataError

ARGS = dict(max_prompt_length=128)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def bos_tok(tiny_tokenizer):
    with_bos = copy.deepcopy(tiny_tokenizer)
    with_bos.bos_token = "<|endoftext|>"
    return with_bos


def rows(*records):
    return [Row(index=i, data=dict(r)) for i, r in enumerate(records)]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- layouts


def test_plain_prompt_string_keeps_other_columns(tok, bos_tok):
    data = build_prompt_examples(rows({"prompt": "Say hi:", "keywords": ["hi"], "target_length": 20}), tok, **ARGS)
    assert data.format == "prompt" and data.skipped == 0
    ex = data.examples[0]
    assert ex.prompt_ids == ids(tok, "Say hi:") and ex.prompt_text == "Say hi:"
    assert ex.columns == {"keywords": ["hi"], "target_length": 20} and ex.row_index == 0
    with_bos = build_prompt_examples(rows({"prompt": "Say hi:"}), bos_tok, **ARGS).examples[0]
    assert with_bos.prompt_ids == [bos_tok.bos_token_id] + ids(bos_tok, "Say hi:")


def test_prompt_as_messages_is_rendered_with_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi there")]
    data = build_prompt_examples(rows({"prompt": messages, "answer": "x"}), tok, **ARGS)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert data.format == "prompt_chat"
    assert text.endswith("<|im_start|>assistant\n")
    assert data.examples[0].prompt_text == text and data.examples[0].prompt_ids == ids(tok, text)
    assert data.examples[0].columns == {"answer": "x"}


def test_messages_drop_the_last_assistant_reply(tok):
    conversation = [user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Fine.")]
    data = build_prompt_examples(rows({"messages": conversation}, {"messages": conversation[:3]}), tok, **ARGS)
    expected = tok.apply_chat_template(conversation[:3], tokenize=False, add_generation_prompt=True)
    assert data.format == "messages"
    assert [e.prompt_text for e in data.examples] == [expected, expected]
    assert data.examples[0].columns == {}


def test_hh_rlhf_pairs_cut_after_last_assistant(tok):
    base = "\n\nHuman: What is a good pet?\n\nAssistant: A cat.\n\nHuman: Why?\n\nAssistant:"
    data = build_prompt_examples(
        rows(
            {"chosen": base + " I think cats are calm.", "rejected": base + " I think you should not."},
            {"chosen": base + " Cats purr.", "rejected": base + " No idea."},
            {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},  # no Assistant tag: the shared start
        ),
        tok,
        **ARGS,
    )
    assert data.format == "chosen_rejected"
    assert [e.prompt_text for e in data.examples] == [base, base, "Q: hi A:"]
    assert data.examples[0].prompt_ids == encode_prompt(tok, base)
    assert set(data.examples[0].columns) == {"chosen", "rejected"}


def test_chat_pairs_share_leading_messages(tok):
    prompt = [user("Pick a color")]
    data = build_prompt_examples(
        rows({"chosen": prompt + [assistant("Blue")], "rejected": prompt + [assistant("Red")]}), tok, **ARGS
    )
    assert data.format == "chosen_rejected_chat"
    assert data.examples[0].prompt_text == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_shipped_smoke_prompts(tok):
    split = load_rows(DatasetConfig(path="builtin:smoke_prompts.jsonl", eval_fraction=0.0), seed=0)
    data = build_prompt_examples(split.train, tok, **ARGS)
    assert len(data.examples) >= 30 and data.format == "prompt"
    for ex in data.examples:
        assert ex.prompt_ids and set(ex.columns) == {"keywords", "target_length"}
        assert 1 <= len(ex.columns["keywords"]) <= 2 and 20 <= ex.columns["target_length"] <= 60


# --------------------------------------------------------------------------- truncation


def test_truncation_keep_end_and_keep_start(tok, bos_tok):
    text = "one two three four five six seven eight nine ten"
    full = ids(tok, text)
    end = build_prompt_examples(rows({"prompt": text}), tok, max_prompt_length=4).examples[0]
    start = build_prompt_examples(rows({"prompt": text}), tok, max_prompt_length=4, truncation_mode="keep_start")
    start = start.examples[0]
    assert end.prompt_ids == full[-4:] and start.prompt_ids == full[:4]
    assert end.prompt_text == text  # the text stays whole
    with_bos = build_prompt_examples(rows({"prompt": text}), bos_tok, max_prompt_length=4).examples[0]
    assert with_bos.prompt_ids == [bos_tok.bos_token_id] + full[-3:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_prompt_length=0), r"algo\.max_prompt_length=0"),
        (dict(max_prompt_length=8, truncation_mode="middle"), r"algo\.truncation_mode='middle'"),
    ],
)
def test_bad_settings(tok, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_prompt_examples(rows({"prompt": "x"}), tok, **kwargs)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "  "}, r"row 1: column 'prompt' is empty"),
        ({"prompt": None}, r"row 1: column 'prompt' is missing or null"),
        ({"prompt": 5}, r"row 1: column 'prompt' must be a string or a list of messages, got int"),
        ({"question": "hi"}, r"row 1: missing column 'prompt'"),
        ({"prompt": [{"role": "user"}]}, r"row 1: prompt\[0\] must be a \{'role', 'content'\} message"),
        ({"prompt": [user(" ")]}, r"row 1: column 'prompt' is empty"),
    ],
)
def test_invalid_prompt_rows_name_the_row_with_hints(tok, bad, message):
    data = rows({"prompt": "fine"}, bad)
    hint = r".*dataset\.columns\.prompt=<your column>.*dataset\.skip_invalid=true"
    with pytest.raises(DataError, match=message + hint):
        build_prompt_examples(data, tok, **ARGS)


def test_no_prompt_column_names_layouts(tok):
    with pytest.raises(DataError, match=r"row 0: no prompt column \(columns: question\).*dataset\.columns\.prompt="):
        build_prompt_examples(rows({"question": "hi"}), tok, **ARGS)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"chosen": "abc", "rejected": "xyz"}, r"row 1: 'chosen' and 'rejected' share no start"),
        ({"chosen": "abc", "rejected": [user("x")]}, r"row 1: 'chosen' and 'rejected' must both be strings"),
        ({"chosen": "abc"}, r"row 1: column 'rejected' is missing or null"),
    ],
)
def test_invalid_pairs(tok, bad, message):
    with pytest.raises(DataError, match=message):
        build_prompt_examples(rows({"chosen": "Q: a A: x", "rejected": "Q: a A: y"}, bad), tok, **ARGS)


def test_conversation_without_prompt_turn(tok):
    with pytest.raises(DataError, match=r"row 0: column 'messages' has no turn before its assistant reply"):
        build_prompt_examples(rows({"messages": [assistant("hi")]}), tok, **ARGS)


def test_skip_invalid_counts_and_keeps_row_indices(tok):
    data = build_prompt_examples(
        rows({"prompt": "a"}, {"prompt": ""}, {"prompt": "c"}, {"other": 1}), tok, skip_invalid=True, **ARGS
    )
    assert data.skipped == 2 and [e.row_index for e in data.examples] == [0, 2]
    with pytest.raises(DataError, match=r"no usable prompts left \(2 rows were skipped"):
        build_prompt_examples(rows({"prompt": ""}, {"prompt": " "}), tok, skip_invalid=True, **ARGS)


# --------------------------------------------------------------------------- collation


def test_collate_left_pads():
    examples = [PromptExample([5, 6, 7], "a", {"k": 1}, 4), PromptExample([8], "b", {"k": 2}, 9)]
    batch = collate_prompts(examples, pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["row_index"].tolist() == [4, 9] and batch["row_index"].dtype == torch.long
    assert batch["examples"] == examples
