"""Pairwise preference data: prompt extraction, tokenization, truncation, validation, collation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignctl.config import DatasetConfig
from alignctl.data.encode import IGNORE_INDEX
from alignctl.data.load import BUILTIN_DIR, Row, load_rows
from alignctl.data.pairwise import (
    PairExample,
    build_pair_examples,
    collate_pairs,
    extract_shared_prompt,
    truncate_joined,
    truncate_pair,
)
from alignctl.errors import ConfigError, DataError
from alignctl.models.tiny import build_tiny_tokenizer

BIG = dict(max_length=256, max_prompt_length=128, truncation_mode="keep_end")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The tiny tokenizer with a BOS token (nothing can be downloaded)."""
    with_bos = copy.deepcopy(tok)
    with_bos.bos_token = "<|endoftext|>"
    assert with_bos.bos_token_id is not None
    return with_bos


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rows(*records):
    return [Row(index=i, data=dict(r)) for i, r in enumerate(records)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- shared prompt tokens


def test_prompt_tokenized_once_even_when_tokenizer_would_merge_across_boundary(tok):
    prompt, chosen, rejected = "Capital of France is ", "Paris.", "Rome."
    # Precondition: joint tokenization merges the trailing space into the answer's first token.
    assert ids(tok, prompt + chosen) != ids(tok, prompt) + ids(tok, chosen)
    data = build_pair_examples(rows({"prompt": prompt, "chosen": chosen, "rejected": rejected}), tok, **BIG)
    (ex,) = data.examples
    assert data.format == "prompt_chosen_rejected"
    assert ex.prompt_ids == ids(tok, prompt)
    n = len(ex.prompt_ids)
    assert ex.chosen_input_ids[:n] == ex.rejected_input_ids[:n] == ex.prompt_ids
    assert ex.chosen_ids == ids(tok, chosen) + [tok.eos_token_id]
    assert ex.rejected_ids == ids(tok, rejected) + [tok.eos_token_id]
    assert ex.chosen_labels == [IGNORE_INDEX] * n + ex.chosen_ids
    assert ex.rejected_labels == [IGNORE_INDEX] * n + ex.rejected_ids
    assert ex.sequence("rejected") == (ex.rejected_input_ids, ex.rejected_labels)


def test_add_eos_false_and_eos_not_doubled(tok):
    records = [{"prompt": "Q?", "chosen": " yes", "rejected": " no<|im_end|>"}]
    (ex,) = build_pair_examples(rows(*records), tok, add_eos=False, **BIG).examples
    assert ex.chosen_ids == ids(tok, " yes")
    (ex,) = build_pair_examples(rows(*records), tok, **BIG).examples
    assert ex.rejected_ids.count(tok.eos_token_id) == 1 and ex.rejected_ids[-1] == tok.eos_token_id


def test_bos_tokenizer_prompt_gets_bos_answers_do_not(bos_tok):
    (ex,) = build_pair_examples(
        rows({"prompt": "Capital of Peru?", "chosen": " It is Lima.", "rejected": " I don't know."}), bos_tok, **BIG
    ).examples
    assert ex.prompt_ids == [bos_tok.bos_token_id] + ids(bos_tok, "Capital of Peru?")
    assert bos_tok.bos_token_id not in ex.chosen_ids + ex.rejected_ids


# --------------------------------------------------------------------------- shared-prefix extraction


def test_extract_shared_prompt_hh_style_space_goes_to_answers():
    chosen = "\n\nHuman: How do I find someone?\n\nAssistant: I can't help with that."
    rejected = "\n\nHuman: How do I find someone?\n\nAssistant: What's their name?"
    prompt, c, r = extract_shared_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: How do I find someone?\n\nAssistant:"
    assert (c, r) == (" I can't help with that.", " What's their name?")
    assert prompt + c == chosen and prompt + r == rejected


def test_extract_shared_prompt_mid_word_and_edge_cases():
    # Split inside a word: no space to move, the shared letters stay in the prompt (as TRL).
    assert extract_shared_prompt("A: yes", "A: yo") == ("A: y", "es", "o")
    # The answers differ at their first character: empty prompt.
    assert extract_shared_prompt("yes", "no") == ("", "yes", "no")
    # One is the start of the other: the true common prefix, the shorter answer is empty.
    assert extract_shared_prompt("Hi", "Hi there") == ("Hi", "", " there")


def test_extract_shared_prompt_message_lists():
    sys = {"role": "system", "content": "Be brief."}
    chosen = [sys, user("Hi"), assistant("Hello."), user("Capital of Peru?"), assistant("It is Lima.")]
    rejected = [sys, user("Hi"), assistant("Hello."), user("Capital of Peru?"), assistant("No idea.")]
    prompt, c, r = extract_shared_prompt(chosen, rejected)
    assert prompt == chosen[:4]
    assert c == [assistant("It is Lima.")] and r == [assistant("No idea.")]


def test_implicit_prompt_string_rows(tok):
    chosen = "\n\nHuman: Capital of Peru?\n\nAssistant: It is Lima."
    rejected = "\n\nHuman: Capital of Peru?\n\nAssistant: No idea."
    data = build_pair_examples(rows({"chosen": chosen, "rejected": rejected}), tok, **BIG)
    (ex,) = data.examples
    assert data.format == "chosen_rejected"
    assert ex.prompt_ids == ids(tok, "\n\nHuman: Capital of Peru?\n\nAssistant:")
    assert ex.chosen_ids == ids(tok, " It is Lima.") + [tok.eos_token_id]
    assert ex.rejected_ids == ids(tok, " No idea.") + [tok.eos_token_id]
    # Answers that start with the same letters keep them in the prompt (TRL's character rule).
    other = "\n\nHuman: Capital of Peru?\n\nAssistant: I don't know."
    (ex,) = build_pair_examples(rows({"chosen": chosen, "rejected": other}), tok, **BIG).examples
    assert ex.prompt_ids == ids(tok, "\n\nHuman: Capital of Peru?\n\nAssistant: I")
    assert ex.chosen_ids == ids(tok, "t is Lima.") + [tok.eos_token_id]


def test_implicit_prompt_message_rows(tok):
    chosen = [user("Capital of Peru?"), assistant("It is Lima.")]
    rejected = [user("Capital of Peru?"), assistant("I don't know.")]
    data = build_pair_examples(rows({"chosen": chosen, "rejected": rejected}), tok, **BIG)
    (ex,) = data.examples
    assert data.format == "chosen_rejected_chat"
    explicit = build_pair_examples(
        rows({"prompt": chosen[:1], "chosen": chosen[1:], "rejected": rejected[1:]}), tok, **BIG
    ).examples[0]
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (
        explicit.prompt_ids,
        explicit.chosen_ids,
        explicit.rejected_ids,
    )


def test_implicit_prompt_errors(tok):
    with pytest.raises(DataError, match=r"row 0: the 'chosen' answer is empty once the shared prompt is removed"):
        build_pair_examples(rows({"chosen": "Q? It is.", "rejected": "Q? It is. Really."}), tok, **BIG)
    with pytest.raises(DataError, match=r"row 0: .*share no leading message"):
        build_pair_examples(rows({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}), tok, **BIG)
    # Strings with nothing in common: empty prompt, as TRL's extract_prompt (allowed).
    (ex,) = build_pair_examples(rows({"chosen": "It is Lima.", "rejected": "No idea."}), tok, **BIG).examples
    assert ex.prompt_ids == [] and ex.chosen_ids == ids(tok, "It is Lima.") + [tok.eos_token_id]


# --------------------------------------------------------------------------- conversational


def test_conversational_rows_use_chat_template(tok):
    prompt = [{"role": "system", "content": "Be brief."}, user("Capital of Peru?")]
    record = {"prompt": prompt, "chosen": [assistant("It is Lima.")], "rejected": [assistant("I don't know.")]}
    data = build_pair_examples(rows(record), tok, **BIG)
    (ex,) = data.examples
    assert data.format == "prompt_chosen_rejected_chat"
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert ex.prompt_ids == ids(tok, prompt_text)
    # The answer is what the template adds after the prompt, end tag included; no extra EOS.
    assert ex.chosen_ids == ids(tok, "It is Lima.<|im_end|>\n")
    assert ex.rejected_ids == ids(tok, "I don't know.<|im_end|>\n")
    assert ex.chosen_ids.count(tok.eos_token_id) == 1


def test_conversational_row_with_string_answer_is_rejected(tok):
    good = {"prompt": [user("Q?")], "chosen": [assistant("A.")], "rejected": [assistant("B.")]}
    bad = {"prompt": [user("Q?")], "chosen": "A.", "rejected": [assistant("B.")]}
    with pytest.raises(DataError, match=r"row 1: column 'chosen' is a string, but this data set is conversational"):
        build_pair_examples(rows(good, bad), tok, **BIG)


# --------------------------------------------------------------------------- truncation


def _pair(prompt_len, chosen_len, rejected_len, bos=None):
    prompt = list(range(1, prompt_len + 1))
    if bos is not None:
        prompt = [bos] + prompt
    return PairExample(prompt, list(range(100, 100 + chosen_len)), list(range(200, 200 + rejected_len)), row_index=7)


def test_truncation_nothing_when_it_fits():
    ex = truncate_pair(_pair(10, 3, 5), 15, 4, "keep_end")  # 10 + 5 == 15
    assert (len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)) == (10, 3, 5)


@pytest.mark.parametrize("mode, kept", [("keep_end", [7, 8, 9, 10]), ("keep_start", [1, 2, 3, 4])])
def test_truncation_prompt_first(mode, kept):
    ex = truncate_pair(_pair(10, 3, 5), 12, 4, mode)  # 10 + 5 > 12: prompt -> 4; 4 + 5 <= 12
    assert ex.prompt_ids == kept
    assert ex.chosen_ids == [100, 101, 102] and ex.rejected_ids == [200, 201, 202, 203, 204]


@pytest.mark.parametrize("mode, kept", [("keep_end", [7, 8, 9, 10]), ("keep_start", [1, 2, 3, 4])])
def test_truncation_then_answers_keep_their_start(mode, kept):
    ex = truncate_pair(_pair(10, 3, 5), 7, 4, mode)  # prompt -> 4; 4 + 5 > 7: answers -> 7 - 4 = 3
    assert ex.prompt_ids == kept
    assert ex.chosen_ids == [100, 101, 102] and ex.rejected_ids == [200, 201, 202]
    assert len(ex.chosen_input_ids) <= 7 and len(ex.rejected_input_ids) <= 7


def test_truncation_answer_budget_is_max_length_minus_max_prompt_length():
    # TRL: a prompt already shorter than max_prompt_length still leaves the answers
    # max_length - max_prompt_length tokens (not max_length - len(prompt)).
    ex = truncate_pair(_pair(3, 2, 6), 8, 4, "keep_end")  # 3 + 6 > 8
    assert ex.prompt_ids == [1, 2, 3]
    assert ex.chosen_ids == [100, 101] and ex.rejected_ids == [200, 201, 202, 203]


def test_truncation_keep_end_keeps_bos():
    ex = truncate_pair(_pair(9, 3, 5, bos=99), 12, 4, "keep_end", bos_token_id=99)
    assert ex.prompt_ids == [99, 7, 8, 9]
    ex = truncate_pair(_pair(9, 3, 5, bos=99), 12, 4, "keep_start", bos_token_id=99)
    assert ex.prompt_ids == [99, 1, 2, 3]


def test_truncation_through_build(tok):
    prompt = "What color is a lemon? What color is a plum? What color is coal?"
    chosen, rejected = " It is yellow.", " I don't know."
    p, c, r = ids(tok, prompt), ids(tok, chosen) + [tok.eos_token_id], ids(tok, rejected) + [tok.eos_token_id]
    longer = max(len(c), len(r))
    assert len(p) > 6 and longer > 4
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    (ex,) = build_pair_examples(rows(record), tok, max_length=6 + longer, max_prompt_length=6, truncation_mode="keep_end").examples
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (p[-6:], c, r)
    (ex,) = build_pair_examples(rows(record), tok, max_length=6 + longer, max_prompt_length=6, truncation_mode="keep_start").examples
    assert ex.prompt_ids == p[:6]
    (ex,) = build_pair_examples(rows(record), tok, max_length=10, max_prompt_length=6, truncation_mode="keep_end").examples
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (p[-6:], c[:4], r[:4])


def test_truncation_settings_are_checked(tok):
    record = rows({"prompt": "Q?", "chosen": " a", "rejected": " b"})
    with pytest.raises(ConfigError, match="max_prompt_length"):
        build_pair_examples(record, tok, max_length=8, max_prompt_length=8, truncation_mode="keep_end")
    with pytest.raises(ConfigError, match="truncation_mode"):
        build_pair_examples(record, tok, max_length=8, max_prompt_length=4, truncation_mode="left")


def test_joined_truncation_keeps_the_start_of_prompt_plus_answer():
    ex = truncate_joined(_pair(10, 3, 5), 12)  # prompt never cut; each answer keeps 12 - 10 = 2
    assert ex.prompt_ids == list(range(1, 11))
    assert ex.chosen_ids == [100, 101] and ex.rejected_ids == [200, 201]
    ex = truncate_joined(_pair(3, 2, 6), 8)  # answers: 8 - 3 = 5 (not max_length - max_prompt_length)
    assert ex.chosen_ids == [100, 101] and ex.rejected_ids == [200, 201, 202, 203, 204]
    with pytest.raises(DataError, match="row 7: the prompt alone has 10 tokens"):
        truncate_joined(_pair(10, 3, 5), 10)


def test_truncation_joined_and_answers_through_build(tok):
    prompt = "What color is a lemon? What color is a plum? What color is coal?"
    chosen, rejected = " It is yellow.", " I don't know."
    p, c, r = ids(tok, prompt), ids(tok, chosen) + [tok.eos_token_id], ids(tok, rejected) + [tok.eos_token_id]
    record = rows({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    limits = dict(max_length=len(p) + 3, max_prompt_length=6, truncation_mode="keep_end")
    (ex,) = build_pair_examples(record, tok, truncation="joined", **limits).examples
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (p, c[:3], r[:3])
    (ex,) = build_pair_examples(record, tok, truncation="answers", **limits).examples
    keep = len(p) + 3 - 6
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (p[-6:], c[:keep], r[:keep])
    with pytest.raises(ConfigError, match="algo.truncation='middle'"):
        build_pair_examples(record, tok, truncation="middle", **limits)
    # a prompt that fills max_length: an error naming the row, or skipped when asked
    short = dict(max_length=len(p), max_prompt_length=6, truncation_mode="keep_end")
    with pytest.raises(DataError, match="row 0"):
        build_pair_examples(record + rows({"prompt": "Q?", "chosen": " a", "rejected": " b"}), tok, truncation="joined", **short)


def test_add_bos_to_prompt_both_ways(bos_tok):
    record = rows({"prompt": "Capital of Peru?", "chosen": " It is Lima.", "rejected": " I don't know."})
    (with_bos,) = build_pair_examples(record, bos_tok, **BIG).examples
    (without,) = build_pair_examples(record, bos_tok, add_bos_to_prompt=False, **BIG).examples
    assert with_bos.prompt_ids == [bos_tok.bos_token_id] + ids(bos_tok, "Capital of Peru?")
    assert without.prompt_ids == ids(bos_tok, "Capital of Peru?")  # TRL 1.x: the prompt as tokenized
    assert without.chosen_ids == with_bos.chosen_ids and without.rejected_ids == with_bos.rejected_ids


# --------------------------------------------------------------------------- margin


def test_margin_column_kept_and_collated(tok):
    data = build_pair_examples(
        rows(
            {"prompt": "Q1?", "chosen": " a", "rejected": " b", "margin": 2},
            {"prompt": "Q2?", "chosen": " c", "rejected": " d", "margin": 0.5},
        ),
        tok,
        **BIG,
    )
    assert [e.margin for e in data.examples] == [2.0, 0.5]
    batch = collate_pairs(data.examples, tok.pad_token_id)
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [2.0, 0.5]
    no_margin = build_pair_examples(rows({"prompt": "Q?", "chosen": " a", "rejected": " b"}), tok, **BIG)
    assert no_margin.examples[0].margin is None
    assert "margin" not in collate_pairs(no_margin.examples, tok.pad_token_id)


@pytest.mark.parametrize("bad", ["big", True, float("nan"), None])
def test_margin_must_be_numeric(tok, bad):
    records = rows(
        {"prompt": "Q1?", "chosen": " a", "rejected": " b", "margin": 1.0},
        {"prompt": "Q2?", "chosen": " c", "rejected": " d", "margin": bad},
    )
    with pytest.raises(DataError, match=r"row 1: column 'margin'"):
        build_pair_examples(records, tok, **BIG)


# --------------------------------------------------------------------------- validation


def test_missing_column_names_row_columns_and_remapping(tok):
    records = rows({"prompt": "Q?", "chosen": " a", "answer_b": " b"})
    with pytest.raises(DataError) as err:
        build_pair_examples(records, tok, **BIG)
    message = str(err.value)
    assert "row 0: missing column 'rejected'" in message
    assert "columns: prompt, chosen, answer_b" in message
    assert "dataset.columns.rejected=" in message


def test_missing_column_in_a_later_row(tok):
    records = rows({"prompt": "Q?", "chosen": " a", "rejected": " b"}, {"prompt": "Q?", "chosen": " a"})
    with pytest.raises(DataError, match=r"row 1: missing column 'rejected' \(columns: prompt, chosen\)"):
        build_pair_examples(records, tok, **BIG)


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"prompt": "Q?", "chosen": "  ", "rejected": " b"}, r"row 1: column 'chosen' is empty"),
        ({"prompt": "Q?", "chosen": " a", "rejected": ""}, r"row 1: column 'rejected' is empty"),
        ({"prompt": "Q?", "chosen": None, "rejected": " b"}, r"row 1: column 'chosen' is empty \(null\)"),
        ({"prompt": "Q?", "chosen": 3, "rejected": " b"}, r"row 1: column 'chosen' must be a string"),
        ({"prompt": "Q?", "chosen": " same", "rejected": " same"}, r"row 1: columns 'chosen' and 'rejected' are identical"),
        ({"prompt": [user("Q?")], "chosen": [assistant("")], "rejected": [assistant("b")]}, r"row 1: column 'chosen' is empty"),
        ({"prompt": [user("Q?")], "chosen": [assistant("x")], "rejected": [assistant("x")]}, r"row 1: columns 'chosen' and 'rejected' are identical"),
    ],
)
def test_invalid_rows_name_the_row_and_field(tok, record, pattern):
    chat = isinstance(record["prompt"], list)
    good = {"prompt": [user("Q?")], "chosen": [assistant("a")], "rejected": [assistant("b")]} if chat else {
        "prompt": "Q?",
        "chosen": " a",
        "rejected": " b",
    }
    with pytest.raises(DataError, match=pattern):
        build_pair_examples(rows(good, record), tok, **BIG)


def test_identical_implicit_pair(tok):
    with pytest.raises(DataError, match=r"row 0: columns 'chosen' and 'rejected' are identical"):
        build_pair_examples(rows({"chosen": "Q? A.", "rejected": "Q? A."}), tok, **BIG)


def test_skip_invalid_counts_and_keeps_row_indices(tok):
    records = rows(
        {"prompt": "Q0?", "chosen": " a", "rejected": " b"},
        {"prompt": "Q1?", "chosen": "", "rejected": " b"},
        {"prompt": "Q2?", "chosen": " same", "rejected": " same"},
        {"prompt": "Q3?", "chosen": " a"},
        {"prompt": "Q4?", "chosen": " c", "rejected": " d"},
    )
    data = build_pair_examples(records, tok, skip_invalid=True, **BIG)
    assert data.skipped == 3
    assert [e.row_index for e in data.examples] == [0, 4]
    with pytest.raises(DataError, match="no usable preference pairs left"):
        build_pair_examples(records[1:4], tok, skip_invalid=True, **BIG)


# --------------------------------------------------------------------------- collation


def test_collate_pairs_layout():
    a = PairExample([1, 2], [10, 11, 12], [20], row_index=5)
    b = PairExample([3], [30], [40, 41, 42, 43], row_index=9)
    batch = collate_pairs([a, b], pad_token_id=0)
    P = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [1, 2, 10, 11, 12],  # chosen a
        [3, 30, 0, 0, 0],  # chosen b
        [1, 2, 20, 0, 0],  # rejected a
        [3, 40, 41, 42, 43],  # rejected b
    ]
    assert batch["labels"].tolist() == [
        [P, P, 10, 11, 12],
        [P, 30, P, P, P],
        [P, P, 20, P, P],
        [P, 40, 41, 42, 43],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["row_index"].tolist() == [5, 9]
    assert batch["seq_lengths"].tolist() == [5, 2, 3, 5]
    assert "margin" not in batch
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long


# --------------------------------------------------------------------------- shipped smoke sets


def test_smoke_pref_sets_build_and_are_separable(tok):
    text = load_rows(DatasetConfig(name="smoke_pref", path="builtin:smoke_pref.jsonl"), seed=0).train
    chat = load_rows(DatasetConfig(name="smoke_pref_chat", path="builtin:smoke_pref_chat.jsonl"), seed=0).train
    assert 30 <= len(text) <= 60 and 15 <= len(chat) <= 30
    text_data = build_pair_examples(text, tok, **BIG)
    chat_data = build_pair_examples(chat, tok, **BIG)
    assert text_data.format == "prompt_chosen_rejected" and chat_data.format == "prompt_chosen_rejected_chat"
    assert text_data.skipped == chat_data.skipped == 0
    for row in text:
        assert len(row.data["prompt"].split()) <= 6
        assert row.data["chosen"].startswith(" It is ") and not row.data["rejected"].startswith(" It is ")
    for row in chat:
        assert row.data["chosen"][0]["content"].startswith("It is ")
        assert not row.data["rejected"][0]["content"].startswith("It is ")
    # Every line is plain JSON with exactly these columns.
    for line in (BUILTIN_DIR / "smoke_pref.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"prompt", "chosen", "rejected"}
