"""`alignctl data preview` (issue 13): the shown rows are the run's encoded rows, and the marked
tokens are exactly those whose labels carry loss."""

import json

import pytest

from alignctl.cli import main
from alignctl.data.encode import IGNORE_INDEX, encode_completion, encode_conversation, encode_prompt
from alignctl.data.load import BUILTIN_DIR
from alignctl.data.preview import build_preview
from alignctl.data.preview_render import CLOSE, OPEN, plain_text

NO_EVAL = "dataset.eval_fraction=0"


def rows_of(name):
    return [json.loads(line) for line in (BUILTIN_DIR / name).read_text().splitlines() if line.strip()]


def loss_of(labels):
    """The rule of the loss: a label set, at a position something precedes."""
    return [i > 0 and label != IGNORE_INDEX for i, label in enumerate(labels)]


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def preview(tokenizer, *overrides, n=3):
    return build_preview([*overrides, NO_EVAL], n=n, tokenizer=tokenizer)


def test_prompt_completion_marks_the_completion(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_sft", n=4)
    data = rows_of("smoke_sft.jsonl")
    assert view.format == "prompt_completion" and len(view.rows) == 4
    for row in view.rows:
        (sequence,) = row.sequences
        prompt, completion = sequence.parts
        source = data[row.row_index]
        assert prompt.name == "prompt" and prompt.ids == encode_prompt(tiny_tokenizer, source["prompt"])
        assert completion.ids == encode_completion(tiny_tokenizer, source["completion"], add_eos=True)
        labels = [IGNORE_INDEX] * len(prompt.ids) + completion.ids
        assert sequence.loss == loss_of(labels)
        assert not any(prompt.loss) and all(completion.loss)


def test_prompt_also_trained_keeps_the_boundary(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_sft", "algo.completion_only_loss=false")
    data = rows_of("smoke_sft.jsonl")
    for row in view.rows:
        prompt, completion = row.sequences[0].parts
        assert prompt.ids == encode_prompt(tiny_tokenizer, data[row.row_index]["prompt"])
        assert row.sequences[0].loss == loss_of(prompt.ids + completion.ids)  # every token but the first


def test_text_rows_train_every_token_but_the_first(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_text")
    data = rows_of("smoke_text.jsonl")
    for row in view.rows:
        (part,) = row.sequences[0].parts
        ids = encode_completion(tiny_tokenizer, data[row.row_index]["text"], add_eos=True)
        if tiny_tokenizer.bos_token_id is not None:
            ids = [tiny_tokenizer.bos_token_id] + ids
        assert part.name == "text" and part.ids == ids
        assert part.loss == loss_of(ids)


def test_chat_rows_mark_the_assistant_turns(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_chat")
    data = rows_of("smoke_chat.jsonl")
    for row in view.rows:
        (part,) = row.sequences[0].parts
        messages = data[row.row_index]["messages"]
        encoded = encode_conversation(tiny_tokenizer, messages, assistant_only=True, row_index=row.row_index)
        assert part.name == "conversation" and part.ids == encoded.input_ids
        assert part.loss == loss_of(encoded.labels)
        trained = decode(tiny_tokenizer, [t for t, m in zip(part.ids, part.loss) if m])
        for message in messages:
            assert (message["content"] in trained) == (message["role"] == "assistant")
        # The assistant turns are shown plainly, the rest dimmed, even with assistant_only_loss off.
        assert part.is_answer() == [label != IGNORE_INDEX for label in encoded.labels]


def test_pairs_mark_each_answer_after_the_shared_prompt(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=dpo", "dataset=smoke_pref")
    data = rows_of("smoke_pref.jsonl")
    assert view.family == "pairs"
    for row in view.rows:
        source = data[row.row_index]
        chosen, rejected = row.sequences
        assert (chosen.title, rejected.title) == ("chosen", "rejected")
        for sequence in (chosen, rejected):
            prompt, answer = sequence.parts
            assert prompt.ids == encode_prompt(tiny_tokenizer, source["prompt"])
            assert answer.ids == encode_completion(tiny_tokenizer, source[sequence.title], add_eos=True)
            assert sequence.loss == loss_of([IGNORE_INDEX] * len(prompt.ids) + answer.ids)


def test_kto_and_prompt_only_rows(tiny_tokenizer):
    kto = preview(tiny_tokenizer, "algo=kto", "dataset=smoke_kto")
    for row in kto.rows:
        for sequence in row.sequences:
            prompt, completion = sequence.parts
            assert sequence.title in ("desirable", "undesirable")
            assert not any(prompt.loss) and all(completion.loss)
    prompts = preview(tiny_tokenizer, "algo=grpo", "dataset=smoke_prompts", "reward=length")
    data = rows_of("smoke_prompts.jsonl")
    for row in prompts.rows:
        (part,) = row.sequences[0].parts
        assert part.ids == encode_prompt(tiny_tokenizer, data[row.row_index]["prompt"])
        assert not any(part.loss)


def test_plain_marks_enclose_exactly_the_loss_tokens(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_chat", n=2)
    for row in view.rows:
        (part,) = row.sequences[0].parts
        text = plain_text(part, [], tiny_tokenizer)
        inside = "".join(chunk.split(CLOSE)[0] for chunk in text.split(OPEN)[1:])
        assert inside == decode(tiny_tokenizer, [t for t, m in zip(part.ids, part.loss) if m])
        assert text.replace(OPEN, "").replace(CLOSE, "") == decode(tiny_tokenizer, part.ids)


def test_truncation_is_counted_over_the_whole_split(tiny_tokenizer):
    max_length, max_prompt = 16, 6
    view = preview(tiny_tokenizer, "algo=dpo", "dataset=smoke_pref", f"algo.max_length={max_length}",
                   f"algo.max_prompt_length={max_prompt}")
    expected = prompt_cut = 0
    for source in rows_of("smoke_pref.jsonl"):
        prompt = len(encode_prompt(tiny_tokenizer, source["prompt"]))
        longer = max(len(encode_completion(tiny_tokenizer, source[k], True)) for k in ("chosen", "rejected"))
        expected += prompt + longer > max_length
        prompt_cut += prompt + longer > max_length and prompt > max_prompt
    assert 0 < expected < view.stats.examples
    assert view.stats.truncated_rows == expected
    assert view.stats.truncated.get("prompt", 0) == prompt_cut
    for row in view.rows:
        for sequence in row.sequences:
            assert len(sequence.ids) <= max_length


def test_packing_is_measured_with_the_runs_packer(tiny_tokenizer):
    from alignctl.data.sft import pack_examples

    view = preview(tiny_tokenizer, "algo=sft", "dataset=smoke_text", "algo.packing=true", "algo.max_length=40")
    lengths = view.stats.lengths
    examples = [type("E", (), {"input_ids": [0] * n, "labels": [0] * n, "row_index": i})() for i, n in enumerate(lengths)]
    assert f"into {len(pack_examples(examples, 40))} rows" in view.stats.packing
    assert view.stats.packing.startswith("on:")


def test_cli_prints_rows_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["data", "preview", "algo=dpo", "dataset=smoke_pref", "n=2", "--plain"])
    out = capsys.readouterr().out
    assert code == 0
    assert "row 0 (line 1)" in out and "row 1 (line 2)" in out and "row 2 " not in out
    assert f"{OPEN} It is Paris." in out
    assert "truncation: no row is cut" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, words",
    [
        (["n=0"], "n=0: must be a whole number >= 1"),
        (["split=test"], "split=test: use split=train or split=eval"),
        (["algo=sft", "dataset=smoke_sft", NO_EVAL, "split=eval"], "no evaluation rows"),
        (["algo=ddpo"], "data preview covers the text algorithms"),
        (["algo=dpo", "beta=1"], "did you mean algo.beta=1"),
    ],
)
def test_cli_refuses_bad_arguments(capsys, args, words):
    code = main(["data", "preview", *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err


def test_cli_unknown_data_subcommand(capsys):
    assert main(["data", "show"]) == 2
    assert "usage: alignctl data preview" in capsys.readouterr().err


def test_a_bad_row_stops_the_preview_naming_file_and_skip(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}, {"prompt": "Q?", "chosen": " same", "rejected": " same"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["data", "preview", "algo=dpo", f"dataset.path={path}", NO_EVAL])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl: row 1 (line 2): columns 'chosen' and 'rejected' are identical" in err
    assert "dataset.skip_invalid=true" in err
    assert main(["data", "preview", "algo=dpo", f"dataset.path={path}", NO_EVAL, "dataset.skip_invalid=true", "--plain"]) == 0
    assert "2 rows -> 1 pairs, 1 row skipped (dataset.skip_invalid=true)" in capsys.readouterr().out


def test_reward_model_rows_mark_the_scored_last_token(tiny_tokenizer):
    view = preview(tiny_tokenizer, "algo=reward", "dataset=smoke_pref", n=2)
    for row in view.rows:
        for sequence in row.sequences:
            assert sequence.loss == [False] * (len(sequence.ids) - 1) + [True]


def test_pairs_follow_the_runs_bos_setting(tiny_tokenizer):
    """The preview tokenizes pairs with the run's own options (algo.add_bos_to_prompt here)."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    for setting, starts_with_bos in (("true", True), ("false", False)):
        view = preview(tokenizer, "algo=dpo", "dataset=smoke_pref", f"algo.add_bos_to_prompt={setting}")
        for row in view.rows:
            for sequence in row.sequences:
                assert (sequence.parts[0].ids[0] == bos) is starts_with_bos, setting
