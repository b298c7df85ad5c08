"""KTO data: unpaired rows, paired -> unpaired conversion, label validation, truncation, KL pairing, collation."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from alignctl.data.encode import IGNORE_INDEX, encode_completion, encode_prompt
from alignctl.data.kto import (
    KTOExample,
    assign_kl_partners,
    build_kto_examples,
    collate_kto,
    warn_if_unbalanced,
    weight_advice,
)
from alignctl.data.load import BUILTIN_DIR, Row
from alignctl.data.pairwise import build_pair_examples
from alignctl.errors import DataError
from alignctl.models.tiny import build_tiny_tokenizer

BIG = dict(max_length=256, max_prompt_length=128, truncation_mode="keep_end")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def rows(*records):
    return [Row(index=i, data=dict(r)) for i, r in enumerate(records)]


def builtin(name):
    lines = (BUILTIN_DIR / name).read_text().splitlines()
    return [Row(index=i, data=json.loads(line)) for i, line in enumerate(lines)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- unpaired rows


def test_unpaired_strings(tok):
    data = build_kto_examples(
        rows({"prompt": "Capital of Peru?", "completion": " It is Lima.", "label": True},
             {"prompt": "Capital of Chad?", "completion": " No idea.", "label": False}),
        tok, **BIG,
    )
    assert data.format == "prompt_completion_label" and not data.converted
    first, second = data.examples
    assert first.prompt_ids == encode_prompt(tok, "Capital of Peru?")
    assert first.completion_ids == encode_completion(tok, " It is Lima.", add_eos=True)
    assert first.completion_ids[-1] == tok.eos_token_id
    assert (first.label, second.label) == (True, False)
    assert (first.row_index, second.row_index) == (0, 1)
    assert first.labels == [IGNORE_INDEX] * len(first.prompt_ids) + first.completion_ids
    assert (data.num_desirable, data.num_undesirable) == (1, 1)


def test_unpaired_conversational_renders_like_pairwise(tok):
    prompt = [user("Capital of Peru?")]
    kto = build_kto_examples(
        rows({"prompt": prompt, "completion": [assistant("It is Lima.")], "label": True},
             {"prompt": prompt, "completion": [assistant("No idea.")], "label": False}),
        tok, **BIG,
    )
    pair = build_pair_examples(
        rows({"prompt": prompt, "chosen": [assistant("It is Lima.")], "rejected": [assistant("No idea.")]}), tok, **BIG
    ).examples[0]
    assert kto.format == "prompt_completion_label_chat"
    good, bad = kto.examples
    assert good.prompt_ids == bad.prompt_ids == pair.prompt_ids
    assert (good.completion_ids, bad.completion_ids) == (pair.chosen_ids, pair.rejected_ids)
    text = tok.decode(good.prompt_ids)
    assert text == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- paired -> unpaired


def test_explicit_pairs_convert_to_unpaired(tok):
    data = build_kto_examples(
        rows({"prompt": "Q1?", "chosen": " Yes one.", "rejected": " No one."},
             {"prompt": "Q2?", "chosen": " Yes two.", "rejected": " No two."}),
        tok, **BIG,
    )
    assert data.converted and data.format == "prompt_chosen_rejected -> unpaired"
    assert [(e.row_index, e.label) for e in data.examples] == [(0, True), (0, False), (1, True), (1, False)]
    chosen, rejected = data.examples[:2]
    assert chosen.prompt_ids == rejected.prompt_ids == encode_prompt(tok, "Q1?")
    assert chosen.completion_ids == encode_completion(tok, " Yes one.", add_eos=True)
    assert rejected.completion_ids == encode_completion(tok, " No one.", add_eos=True)


def test_implicit_prompt_pairs_convert(tok):
    data = build_kto_examples(rows({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}), tok, **BIG)
    assert data.format == "chosen_rejected -> unpaired"
    chosen, rejected = data.examples
    assert chosen.prompt_ids == rejected.prompt_ids == encode_prompt(tok, "Q: hi A:")
    assert tok.decode(chosen.completion_ids) == " yes" + tok.eos_token
    assert tok.decode(rejected.completion_ids) == " no" + tok.eos_token


def test_builtin_preference_sets_convert(tok):
    text = build_kto_examples(builtin("smoke_pref.jsonl"), tok, **BIG)
    chat = build_kto_examples(builtin("smoke_pref_chat.jsonl"), tok, **BIG)
    assert len(text.examples) == 80 and text.num_desirable == text.num_undesirable == 40
    assert chat.format == "prompt_chosen_rejected_chat -> unpaired" and len(chat.examples) == 40


def test_pair_errors_keep_the_pairwise_messages(tok):
    with pytest.raises(DataError, match=r"row 1: columns 'chosen' and 'rejected' are identical"):
        build_kto_examples(rows({"prompt": "a", "chosen": " x", "rejected": " y"},
                                {"prompt": "b", "chosen": " z", "rejected": " z"}), tok, **BIG)


# --------------------------------------------------------------------------- validation


def test_non_bool_label_names_row_and_value(tok):
    records = [{"prompt": f"Q{i}?", "completion": " A.", "label": i % 2 == 0} for i in range(3)]
    records.append({"prompt": "Q3?", "completion": " A.", "label": "yes"})
    with pytest.raises(DataError, match=r"^row 3: column 'label' must be true or false, got 'yes'; .*dataset\.skip_invalid=true"):
        build_kto_examples(rows(*records), tok, **BIG)
    records[3]["label"] = 1
    with pytest.raises(DataError, match=r"row 3: column 'label' must be true or false, got 1"):
        build_kto_examples(rows(*records), tok, **BIG)
    records[3]["label"] = None
    with pytest.raises(DataError, match=r"row 3: column 'label' must be true or false, got None"):
        build_kto_examples(rows(*records), tok, **BIG)
    del records[3]["label"]
    with pytest.raises(DataError, match=r"row 3: missing column 'label'"):
        build_kto_examples(rows(*records), tok, **BIG)
    # skip_invalid drops the row and counts it
    records[3]["label"] = "yes"
    data = build_kto_examples(rows(*records), tok, **BIG, skip_invalid=True)
    assert data.skipped == 1 and [e.row_index for e in data.examples] == [0, 1, 2]


def test_missing_and_wrong_columns(tok):
    with pytest.raises(DataError, match=r"row 0: missing column 'completion'.*dataset.columns.completion"):
        build_kto_examples(rows({"prompt": "Q?", "label": True}), tok, **BIG)
    with pytest.raises(DataError, match=r"row 0: no 'completion'/'label' or 'chosen'/'rejected' columns"):
        build_kto_examples(rows({"text": "hello"}), tok, **BIG)
    with pytest.raises(DataError, match=r"row 1: column 'completion' is empty"):
        build_kto_examples(rows({"prompt": "Q?", "completion": " A.", "label": True},
                                {"prompt": "Q?", "completion": "  ", "label": False}), tok, **BIG)
    with pytest.raises(DataError, match=r"row 1: column 'prompt' is a string, but this data set is conversational"):
        build_kto_examples(rows({"prompt": [user("Q?")], "completion": [assistant("A.")], "label": True},
                                {"prompt": "Q?", "completion": [assistant("A.")], "label": False}), tok, **BIG)


# --------------------------------------------------------------------------- truncation


def test_truncation_follows_the_pairwise_rule_per_example(tok):
    long_answer = " " + "word " * 40
    data = build_kto_examples(
        rows({"prompt": "Which long question is this one?", "chosen": " Short.", "rejected": long_answer}),
        tok, max_length=32, max_prompt_length=8, truncation_mode="keep_end",
    )
    chosen, rejected = data.examples
    full_prompt = encode_prompt(tok, "Which long question is this one?")
    # each example on its own: the short answer keeps the whole prompt, the long one cuts both
    assert len(full_prompt) + len(chosen.completion_ids) <= 32 and chosen.prompt_ids == full_prompt
    assert rejected.prompt_ids == full_prompt[-8:]
    assert len(rejected.completion_ids) == 32 - 8
    for example in data.examples:
        assert len(example.input_ids) <= 32 and len(example.kl_input_ids) <= 32


# --------------------------------------------------------------------------- KL pairing


@pytest.mark.parametrize("name", ["smoke_pref.jsonl", "smoke_kto.jsonl", "smoke_pref_chat.jsonl"])
def test_kl_pairs_never_pair_a_completion_with_its_own_prompt(tok, name):
    data = build_kto_examples(builtin(name), tok, **BIG)
    examples = data.examples
    assert data.kl_same_prompt == 0 and data.kl_shift >= 1
    # a rotation: every completion is used exactly once as a KL completion
    assert sorted(map(tuple, (e.kl_completion_ids for e in examples))) == sorted(map(tuple, (e.completion_ids for e in examples)))
    position = {id(e): i for i, e in enumerate(examples)}

    def partner(e):
        return examples[(position[id(e)] + data.kl_shift) % len(examples)]

    for e in examples:
        assert e.kl_prompt_ids == e.prompt_ids  # nothing to truncate here
        assert partner(e) is not e and partner(e).prompt_ids != e.prompt_ids
        assert e.kl_completion_ids == partner(e).completion_ids
    # any batch the loader may form, any size, including B = 1
    rng = random.Random(0)
    order = list(range(len(examples)))
    for batch_size in (1, 2, 3, 8):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            batch = collate_kto(chunk, tok.pad_token_id)
            b = len(chunk)
            assert batch["input_ids"].shape[0] == 2 * b
            for i, e in enumerate(chunk):
                main, kl = batch["input_ids"][i].tolist(), batch["input_ids"][b + i].tolist()
                assert main[: len(e.input_ids)] == e.input_ids
                # KL row: this example's prompt, then the completion of another example with another prompt
                assert kl[: len(e.kl_input_ids)] == e.prompt_ids + partner(e).completion_ids


def test_kl_pairing_skips_same_prompt_neighbours(tok):
    # converted pairs sit next to each other (same prompt): a shift of 1 would pair them
    data = build_kto_examples(builtin("smoke_pref.jsonl"), tok, **BIG)
    assert data.kl_shift == 2
    examples = [KTOExample([1, 2], [3, 4], True), KTOExample([1, 2], [5, 6], False)]
    # two examples with one prompt: no mismatched pair exists; the pairing still uses the other completion
    assert assign_kl_partners(examples, 64, 8, "keep_end") == (1, 2)
    assert examples[0].kl_completion_ids == [5, 6] and examples[1].kl_completion_ids == [3, 4]


def test_single_example_has_no_kl_rows(tok):
    data = build_kto_examples(rows({"prompt": "Q?", "completion": " A.", "label": True}), tok, **BIG)
    assert data.kl_shift == 0 and not data.examples[0].has_kl
    batch = collate_kto(data.examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 1 and batch["seq_lengths"].shape == (1,)


def test_no_kl_pairs_for_apo_zero(tok):
    data = build_kto_examples(builtin("smoke_kto.jsonl"), tok, **BIG, kl_pairs=False)
    assert not any(e.has_kl for e in data.examples)
    batch = collate_kto(data.examples[:4], tok.pad_token_id, with_kl=False)
    assert batch["input_ids"].shape[0] == 4


def test_collate_layout_and_precomputed_reference(tok):
    data = build_kto_examples(builtin("smoke_kto.jsonl"), tok, **BIG)
    chunk = data.examples[:3]
    batch = collate_kto(chunk, tok.pad_token_id)
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [e.label for e in chunk]
    assert batch["row_index"].tolist() == [e.row_index for e in chunk]
    lengths = [len(e.input_ids) for e in chunk] + [len(e.kl_input_ids) for e in chunk]
    assert batch["seq_lengths"].tolist() == lengths
    assert batch["input_ids"].shape == batch["labels"].shape == (6, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, e in enumerate(chunk):
        assert batch["labels"][row, : len(e.prompt_ids)].eq(IGNORE_INDEX).all()
        assert batch["labels"][3 + row, len(e.prompt_ids) : len(e.kl_input_ids)].tolist() == e.kl_completion_ids
    assert "ref_logps" not in batch
    for k, e in enumerate(chunk):
        e.ref_logps = (float(k), 10.0 + k)
    assert collate_kto(chunk, tok.pad_token_id)["ref_logps"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    for e in chunk:
        e.ref_logps = None


# --------------------------------------------------------------------------- balance of desirable / undesirable


def test_weight_advice_follows_the_paper_range():
    assert weight_advice(10, 10, 1.0, 1.0) is None
    assert weight_advice(12, 10, 1.0, 1.0) is None  # ratio 1.2
    assert weight_advice(10, 30, 1.0, 1.0) is not None  # ratio 1/3
    advice = weight_advice(30, 10, 1.0, 1.0)  # ratio 3
    assert "30 desirable / 10 undesirable" in advice and "[1, 4/3]" in advice
    # TRL's suggestions: desirable_weight in [u*nu/nd, 4/3 of that], undesirable_weight in [d*nd/nu / (4/3), d*nd/nu]
    assert "algo.desirable_weight in [0.333, 0.444]" in advice and "algo.undesirable_weight in [2.25, 3]" in advice
    assert weight_advice(10, 30, 3.0, 1.0) is None  # rebalanced by the weight
    assert "only desirable" in weight_advice(5, 0, 1.0, 1.0)


def test_imbalanced_data_warns(tok):
    records = [{"prompt": f"Q{i}?", "completion": " A.", "label": i < 6} for i in range(8)]
    data = build_kto_examples(rows(*records), tok, **BIG)
    with pytest.warns(UserWarning, match=r"6 desirable / 2 undesirable .* outside the KTO paper's recommended"):
        warn_if_unbalanced(data, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_unbalanced(data, 1.0, 3.0) is None  # 6 / (3 * 2) = 1
