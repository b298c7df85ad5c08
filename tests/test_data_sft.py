"""SFT data: formats -> ids and labels, masking, truncation, packing, row-named errors."""

import json

import pytest
import torch

from alignctl.algo_configs import SFTConfig
from alignctl.config import DatasetConfig
from alignctl.data.collate import collate_packed, collate_sequences
from alignctl.data.encode import IGNORE_INDEX
from alignctl.data.load import Row, load_rows
from alignctl.data.sft import build_sft_examples, pack_examples
from alignctl.errors import DataError


def rows(*records):
    return [Row(index=i, data=r) for i, r in enumerate(records)]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    data = build_sft_examples(rows({"prompt": "What is 2 plus 5?", "completion": " 7."}), tok, SFTConfig(), False)
    ex = data.examples[0]
    prompt_ids, completion_ids = ids(tok, "What is 2 plus 5?"), ids(tok, " 7.") + [tok.eos_token_id]
    assert data.format == "prompt_completion"
    assert ex.input_ids == prompt_ids + completion_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def test_prompt_completion_without_masking_trains_everything(tiny_tokenizer):
    cfg = SFTConfig(completion_only_loss=False)
    ex = build_sft_examples(rows({"prompt": "Hi", "completion": " there"}), tiny_tokenizer, cfg, False).examples[0]
    assert ex.labels == ex.input_ids


def test_text_trains_every_token_and_appends_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = build_sft_examples(rows({"text": "The cat says meow."}), tok, SFTConfig(), False).examples[0]
    assert ex.input_ids == ids(tok, "The cat says meow.") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_conversation_labels_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "Louder?"},
        {"role": "assistant", "content": "LIMA!"},
    ]
    ex = build_sft_examples(rows({"messages": messages}), tok, SFTConfig(), False).examples[0]
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == "Lima.<|im_end|>\nLIMA!<|im_end|>\n"
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    every = build_sft_examples(rows({"messages": messages}), tok, SFTConfig(assistant_only_loss=False), False)
    assert every.examples[0].labels == every.examples[0].input_ids


def test_conversational_prompt_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    record = {
        "prompt": [{"role": "user", "content": "Capital of Chile?"}],
        "completion": [{"role": "assistant", "content": "Santiago."}],
    }
    ex = build_sft_examples(rows(record), tok, SFTConfig(), False).examples[0]
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == "Santiago.<|im_end|>\n"
    prompt_text = tok.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    assert ex.input_ids[: len(ids(tok, prompt_text))] == ids(tok, prompt_text)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes(tiny_tokenizer, mode):
    tok = tiny_tokenizer
    text = "The dog says woof all day long and the cat says meow all night long."
    full = ids(tok, text) + [tok.eos_token_id]
    ex = build_sft_examples(rows({"text": text}), tok, SFTConfig(max_length=6, truncation_mode=mode), False).examples[0]
    assert ex.input_ids == (full[:6] if mode == "keep_start" else full[-6:])


def test_completion_truncated_away_is_an_error_naming_the_row(tiny_tokenizer):
    long_prompt = "What is the capital of France and Italy and Spain and Japan?"
    data = rows({"prompt": "Hi", "completion": " yo"}, {"prompt": long_prompt, "completion": " Paris."})
    with pytest.raises(DataError, match=r"row 1: no trained tokens left after truncation"):
        build_sft_examples(data, tiny_tokenizer, SFTConfig(max_length=4), False)


def test_missing_column_names_the_row(tiny_tokenizer):
    data = rows({"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}, {"prompt": "e"})
    with pytest.raises(DataError, match=r"row 2: missing column 'completion'"):
        build_sft_examples(data, tiny_tokenizer, SFTConfig(), False)


def test_empty_completion_is_an_error_or_counted_when_skipping(tiny_tokenizer):
    data = rows({"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": "   "})
    with pytest.raises(DataError, match=r"row 1: column 'completion' is empty"):
        build_sft_examples(data, tiny_tokenizer, SFTConfig(), False)
    kept = build_sft_examples(data, tiny_tokenizer, SFTConfig(), skip_invalid=True)
    assert kept.skipped == 1 and len(kept.examples) == 1


def test_unknown_format_suggests_column_remap(tiny_tokenizer):
    with pytest.raises(DataError, match="dataset.columns"):
        build_sft_examples(rows({"question": "a", "answer": "b"}), tiny_tokenizer, SFTConfig(), False)


def test_column_remap_and_eval_fraction(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(10)))
    cfg = DatasetConfig(name="qa", path=str(path), columns={"prompt": "question", "completion": "answer"}, eval_fraction=0.2)
    splits = load_rows(cfg, seed=1)
    assert len(splits.train) == 8 and len(splits.eval) == 2
    assert set(splits.train[0].data) == {"prompt", "completion"}
    all_indices = sorted(r.index for r in splits.train + splits.eval)
    assert all_indices == list(range(10))


def test_missing_local_dataset_path_is_clear(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(DatasetConfig(name="x", path=str(tmp_path / "nope.jsonl")), seed=0)


def test_packing_keeps_examples_apart(tiny_tokenizer):
    import copy

    from alignctl.models.logps import sequence_logps
    from alignctl.models.tiny import build_tiny_model
    from alignctl.config import ArchConfig

    tok = tiny_tokenizer
    records = [{"prompt": f"What is {a} plus 3?", "completion": f" {a + 3}."} for a in range(2, 8)]
    plain = build_sft_examples(rows(*records), tok, SFTConfig(), False).examples
    packed = pack_examples(copy.deepcopy(plain), max_length=48)
    assert len(packed) < len(plain)
    assert all(len(p.input_ids) <= 48 for p in packed)
    # every original example appears whole inside exactly one packed row
    flat = sorted(tuple(p.input_ids[s:e]) for p in packed for s, e in zip(p.starts, p.starts[1:] + [len(p.input_ids)]))
    assert flat == sorted(tuple(e.input_ids) for e in plain)

    model = build_tiny_model(ArchConfig(), tok).eval()
    batch = collate_packed(packed, tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_out = sequence_logps(model, batch["input_ids"], None, batch["labels"], position_ids=batch["position_ids"])
        single = collate_sequences(plain, tok.pad_token_id)
        plain_out = sequence_logps(model, single["input_ids"], single["attention_mask"], single["labels"])
    # the packed rows hold the same trained tokens with the same log-probs: attention never crossed
    assert int(packed_out.num_tokens.sum()) == int(plain_out.num_tokens.sum())
    assert torch.allclose(packed_out.sum_logps.sum(), plain_out.sum_logps.sum(), atol=1e-4)


def test_collate_pads_to_longest_in_batch(tiny_tokenizer):
    data = build_sft_examples(rows({"text": "Hi"}, {"text": "The cat says meow."}), tiny_tokenizer, SFTConfig(), False)
    batch = collate_sequences(data.examples, tiny_tokenizer.pad_token_id)
    longest = max(len(e.input_ids) for e in data.examples)
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum().item() == sum(len(e.input_ids) for e in data.examples)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match=r"dataset.path=someone/some-dataset: not a local file or directory.*go online"):
        load_rows(DatasetConfig(name="x", path="someone/some-dataset"), seed=0)
