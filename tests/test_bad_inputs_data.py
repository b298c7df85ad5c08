"""Bad inputs of data, models and LoRA settings (issue 9, part B), as a user gives them.

One table: each case writes what it needs under tmp_path, runs `alignctl train` in-process and
checks the exit code, that the error is ONE line holding the expected words (key, file, row, the
way out), that no traceback is printed, and that a refused run left no run directory contents.
A few cases that must work (renames, skip_invalid, a tokenizer-only folder, attention kernels)
follow the table.
"""

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch

from alignctl.cli import main

FAST = ["train.max_steps=1", "train.save_steps=0", "train.eval_steps=0", "run.progress=false"]
SFT_ROWS = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(6)]
PAIR_ROWS = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(6)]
KTO_ROWS = [{"prompt": f"Q{i}?", "completion": f" A{i}.", "label": i % 2 == 0} for i in range(6)]
PROMPT_ROWS = [{"prompt": f"Count to {i}."} for i in range(6)]


# --------------------------------------------------------------------------- helpers for setups


def jsonl(name: str, rows: list, edit: Optional[Callable[[list], None]] = None) -> Callable[[Path], List[str]]:
    """A setup writing ``rows`` (after ``edit``) as JSON lines and pointing dataset.path at it."""

    def setup(tmp: Path) -> List[str]:
        data = [dict(r) for r in rows]
        if edit:
            edit(data)
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        return [f"dataset.path={tmp / name}", "dataset.eval_fraction=0"]

    return setup


def raw(name: str, content, *extra: str) -> Callable[[Path], List[str]]:
    """A setup writing ``content`` (bytes or text) to ``name``; dataset.path points at it (or, when
    the name has a folder, at that folder)."""

    def setup(tmp: Path) -> List[str]:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content(tmp) if callable(content) else content
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        target = path.parent if "/" in name else path
        return [f"dataset.path={target}", "dataset.eval_fraction=0", *extra]

    return setup


def lines(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def set_row(index: int, **values):
    def edit(data: list) -> None:
        for key, value in values.items():
            if value is DELETE:
                data[index].pop(key, None)
            else:
                data[index][key] = value

    return edit


DELETE = object()


def parquet_bytes(tmp: Path) -> bytes:
    import pandas

    pandas.DataFrame(SFT_ROWS).to_parquet(tmp / "tmp.parquet")
    return (tmp / "tmp.parquet").read_bytes()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model + tokenizer: a local model folder to load (and to corrupt)."""
    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_tiny_tokenizer(512)
    build_tiny_model(ArchConfig(), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_copy(mutate: Optional[Callable[[bytes], bytes]] = None, key: str = "model.name_or_path"):
    """A setup copying the saved tiny model (its weights mutated) and pointing ``key`` at it."""

    def setup(tmp: Path, model_dir: Path) -> List[str]:
        folder = tmp / "model"
        shutil.copytree(model_dir, folder)
        weights = folder / "model.safetensors"
        if mutate:
            weights.write_bytes(mutate(weights.read_bytes()))
        if key == "model.name_or_path":
            return ["model.arch=null", f"model.name_or_path={folder}"]
        return [f"{key}={folder}"]

    setup.needs_model = True
    return setup


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noise_after_header(data: bytes) -> bytes:
    """A valid safetensors header with NaN-filled data (what random bytes tend to produce)."""
    start = struct.unpack("<Q", data[:8])[0] + 8
    return data[:start] + b"\xff\xff\xff\x7f" * ((len(data) - start) // 4) + b"\x00" * ((len(data) - start) % 4)


def other_bytes(data: bytes) -> bytes:
    return bytes(range(256)) * (len(data) // 256 + 1)


def no_flash_attention() -> bool:
    try:
        import flash_attn  # noqa: F401

        return False
    except ImportError:
        return not torch.cuda.is_available()


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    args: List[str]
    expect: List[str]  # substrings of the one error line
    setup: Optional[Callable] = None
    code: int = 2
    skip: Optional[str] = None  # reason to skip here
    extra_stderr: List[str] = field(default_factory=list)  # substrings elsewhere in stderr (warnings)


SFT, DPO, KTO, PPO = "recipe=smoke/sft", "recipe=smoke/dpo", "recipe=smoke/kto", "recipe=smoke/ppo"
SKIP_ROW = "dataset.skip_invalid=true"

CASES = [
    # ---- data files: empty, malformed, binary, not objects, missing split file (part B.1)
    Case("empty-jsonl", [SFT], ["empty.jsonl", "the file is empty"], raw("empty.jsonl", "")),
    Case("blank-jsonl", [SFT], ["blank.jsonl", "the file is empty"], raw("blank.jsonl", "\n  \n\n")),
    Case("truncated-last-line", [SFT], ["cut.jsonl, line 6", "invalid JSON", "cut short"],
         raw("cut.jsonl", lines(SFT_ROWS)[:-12])),
    Case("malformed-middle-line", [SFT], ["bad.jsonl, line 3", "invalid JSON", "Expecting ',' delimiter"],
         raw("bad.jsonl", lines(SFT_ROWS[:2]) + '{"prompt": "Q" "completion": " A"}\n' + lines(SFT_ROWS[2:]))),
    Case("malformed-first-line", [SFT], ["first.jsonl, line 1", "invalid JSON"],
         raw("first.jsonl", "prompt,completion\n" + lines(SFT_ROWS))),
    Case("binary-jsonl", [SFT], ["bin.jsonl", "binary content", "not json text"],
         raw("bin.jsonl", bytes(range(256)) * 8)),
    Case("not-utf8-jsonl", [SFT], ["latin.jsonl, line 3", "not UTF-8"],
         raw("latin.jsonl", lines(SFT_ROWS[:2]).encode() + '{"prompt": "caf\xe9", "completion": " x"}\n'.encode("latin-1"))),
    Case("row-is-a-list", [SFT], ["list.jsonl, line 2", "a row must be a JSON object", "got a list"],
         raw("list.jsonl", lines(SFT_ROWS[:1]) + '["Q?", " A."]\n')),
    Case("row-is-a-string", [SFT], ["str.jsonl, line 1", "a row must be a JSON object", "got a string"],
         raw("str.jsonl", '"just text"\n')),
    Case("json-list-of-strings", [SFT], ["strings.json, item 0", "a row must be a JSON object"],
         raw("strings.json", json.dumps(["a", "b"]))),
    Case("json-malformed", [SFT], ["broken.json, line 1", "invalid JSON"], raw("broken.json", json.dumps(SFT_ROWS)[:-3])),
    Case("json-one-object", [SFT], ["obj.json", "holds one JSON object (keys: data, meta)", "not rows"],
         raw("obj.json", json.dumps({"data": SFT_ROWS, "meta": 1}, indent=2))),
    Case("json-a-number", [SFT], ["num.json, line 1", "a row must be a JSON object", "got a number"], raw("num.json", "42")),
    Case("csv-empty", [SFT], ["empty.csv", "the file is empty"], raw("empty.csv", "")),
    Case("csv-ragged", [SFT], ["ragged.csv", "cannot be read as CSV", "Expected 2 fields in line 3, saw 3"],
         raw("ragged.csv", "prompt,completion\nQ?, A.\nQ2?, A2., extra\n")),
    Case("csv-binary", [SFT], ["bin.csv", "binary content"], raw("bin.csv", bytes(range(256)) * 4)),
    Case("parquet-random", [SFT], ["rand.parquet", "not a parquet file"], raw("rand.parquet", bytes(range(256)) * 4)),
    Case("parquet-truncated", [SFT], ["cut.parquet", "not a parquet file"], raw("cut.parquet", lambda t: parquet_bytes(t)[:300])),
    Case("parquet-empty", [SFT], ["empty.parquet", "the file is empty"], raw("empty.parquet", b"")),
    Case("folder-without-split-file", [SFT], ["no file for split 'train'", "other.jsonl", "dataset.train_split"],
         raw("data/other.jsonl", lines(SFT_ROWS))),
    Case("folder-without-eval-file", [DPO, "dataset.eval_split=validation"], ["no file for split 'validation'"],
         raw("pairs/train.jsonl", lines(PAIR_ROWS))),
    Case("unsupported-extension", [SFT], ["data.txt", "unsupported file type '.txt'"], raw("data.txt", "hello")),
    Case("missing-file", [SFT, "dataset.path=/nonexistent/train.jsonl"], ["dataset.path=/nonexistent/train.jsonl", "no such file"]),
    # ---- renames whose source column is absent (part B.2)
    Case("rename-missing-column", [SFT, "dataset.columns.prompt=question"],
         ["dataset.columns.prompt=question", "has no column 'question'", "prompt, completion"], jsonl("t.jsonl", SFT_ROWS)),
    Case("rename-missing-column-builtin", [DPO, "dataset.columns.chosen=good"],
         ["dataset.columns.chosen=good", "builtin smoke_pref.jsonl has no column 'good'"]),
    Case("rename-missing-in-eval-split", [DPO, "dataset.eval_split=test", "dataset.columns.prompt=q"],
         ["dataset.columns.prompt=q", "test.jsonl has no column 'q'"],
         lambda t: [raw("d/train.jsonl", lines([{"q": r["prompt"], **r} for r in PAIR_ROWS]))(t),
                    raw("d/test.jsonl", lines(PAIR_ROWS))(t)][1]),
    Case("rename-missing-csv", [SFT, "dataset.columns.completion=answer"], ["has no column 'answer'"],
         raw("t.csv", "prompt,completion\nQ?, A.\n")),
    # ---- model paths (part B.3)
    Case("ref-path-missing", [DPO, "model.ref_name_or_path=/nonexistent/ref"], ["model.ref_name_or_path=/nonexistent/ref", "no such directory"]),
    Case("tokenizer-path-missing", [SFT, "model.tokenizer_name_or_path=/nonexistent/tok"],
         ["model.tokenizer_name_or_path=/nonexistent/tok", "model.arch is set"]),
    Case("tokenizer-path-missing-real-model", [SFT, "model.tokenizer_name_or_path=/nonexistent/tok"],
         ["model.tokenizer_name_or_path=/nonexistent/tok", "no such directory"], model_copy()),
    Case("tokenizer-dir-not-a-tokenizer", [SFT], ["model.tokenizer_name_or_path=", "is not a transformers tokenizer directory"],
         lambda t, m: model_copy()(t, m) + [f"model.tokenizer_name_or_path={_mkdir(t / 'empty')}"]),
    Case("path-beside-tiny-arch", [SFT, "model.name_or_path=/some/dir"],
         ["model.name_or_path=/some/dir", "model.arch is set", "model.arch=null", "pick a model preset (model=", "smollm2"]),
    Case("hub-id-beside-tiny-arch", [SFT, "model.name_or_path=HuggingFaceTB/SmolLM2-135M"],
         ["model.name_or_path=HuggingFaceTB/SmolLM2-135M", "would be ignored", "model.arch=null"]),
    Case("gguf-beside-tiny-arch", [SFT, "model.gguf_file=model.gguf"], ["model.gguf_file=model.gguf", "model.arch is set"]),
    Case("weights-truncated", [SFT], ["model.name_or_path=", "model.safetensors is corrupt or truncated"], model_copy(truncated)),
    Case("weights-random-bytes", [SFT], ["model.name_or_path=", "model.safetensors is corrupt"], model_copy(other_bytes)),
    Case("weights-nan-after-valid-header", [SFT], ["model.name_or_path=", "holds NaN or inf", "model.safetensors", "corrupt"],
         model_copy(noise_after_header)),
    Case("ref-weights-corrupt", [DPO], ["model.ref_name_or_path=", "model.safetensors is corrupt or truncated"],
         model_copy(truncated, key="model.ref_name_or_path")),
    Case("ref-weights-nan", [DPO], ["model.ref_name_or_path=", "holds NaN or inf"], model_copy(noise_after_header, key="model.ref_name_or_path")),
    # ---- attention implementation (part B.4)
    Case("attn-unknown", [SFT, "model.attn_implementation=fast"],
         ["model.attn_implementation=fast", "unknown attention implementation", "eager", "sdpa", "flash_attention_2"]),
    Case("attn-unknown-real-model", [SFT, "model.attn_implementation=flash2"], ["model.attn_implementation=flash2", "eager"], model_copy()),
    Case("attn-flash-on-tiny-without-flash-attn", [SFT, "model.attn_implementation=flash_attention_2"],
         ["model.attn_implementation=flash_attention_2", "FlashAttention2"],
         skip=None if no_flash_attention() else "flash-attn or a GPU is available here"),
    # ---- LoRA settings (part B.5)
    Case("peft-r-zero", [SFT, "peft=lora", "peft.r=0"], ["peft.r=0", "positive integer"]),
    Case("peft-r-negative", [SFT, "peft=lora", "peft.r=-4"], ["peft.r=-4"]),
    Case("peft-alpha-negative", [SFT, "peft=lora", "peft.alpha=-1"], ["peft.alpha=-1", "must be positive"]),
    Case("peft-alpha-zero", [DPO, "peft=lora", "peft.alpha=0"], ["peft.alpha=0"]),
    Case("peft-dropout-one", [SFT, "peft=lora", "peft.dropout=1.0"], ["peft.dropout=1.0", "[0, 1)"]),
    Case("peft-dropout-negative", [SFT, "peft=lora", "peft.dropout=-0.1"], ["peft.dropout=-0.1"]),
    Case("peft-targets-empty", [SFT, "peft=lora", "peft.target_modules=[]"], ["peft.target_modules=[]", "all-linear"]),
    Case("peft-targets-unknown", [SFT, "peft=lora", "peft.target_modules=[nope]"], ["peft.target_modules=['nope']"]),
    # ---- trust_remote_code names the repository once (part B.6); the run then stops on a bad LoRA target
    Case("trust-remote-code-warns-once", [SFT, "model.trust_remote_code=true", "peft=lora", "peft.target_modules=[nope]"],
         ["peft.target_modules=['nope']"], model_copy(), extra_stderr=["model.trust_remote_code=true", "will run"]),
    # ---- unusable rows: file, row, line and the way out (part B.7)
    Case("sft-empty-completion", [SFT], ["t.jsonl: row 2 (line 3): column 'completion' is empty", SKIP_ROW],
         jsonl("t.jsonl", SFT_ROWS, set_row(2, completion="  "))),
    Case("sft-null-completion", [SFT], ["t.jsonl: row 3 (line 4): column 'completion' is missing or null", SKIP_ROW],
         jsonl("t.jsonl", SFT_ROWS, set_row(3, completion=DELETE))),
    Case("sft-completion-not-text", [SFT], ["t.jsonl: row 1 (line 2): column 'completion' must be a string", SKIP_ROW],
         jsonl("t.jsonl", SFT_ROWS, set_row(1, completion=5))),
    Case("sft-unknown-format", [SFT], ["t.jsonl: row 0 (line 1): cannot tell the SFT format", "dataset.columns.prompt="],
         jsonl("t.jsonl", [{"question": "Q?", "answer": " A."}] * 3)),
    Case("sft-csv-empty-completion", [SFT], ["t.csv: row 1: column 'completion'", SKIP_ROW],
         raw("t.csv", "prompt,completion\nQ?, A.\nQ2?,\n")),
    Case("dpo-empty-chosen", [DPO], ["p.jsonl: row 4 (line 5): column 'chosen' is empty", SKIP_ROW],
         jsonl("p.jsonl", PAIR_ROWS, set_row(4, chosen=""))),
    Case("dpo-empty-rejected", [DPO], ["p.jsonl: row 1 (line 2): column 'rejected' is empty", SKIP_ROW],
         jsonl("p.jsonl", PAIR_ROWS, set_row(1, rejected=" "))),
    Case("dpo-identical-answers", [DPO], ["p.jsonl: row 0 (line 1): columns 'chosen' and 'rejected' are identical", SKIP_ROW],
         jsonl("p.jsonl", PAIR_ROWS, set_row(0, rejected=" good 0"))),
    Case("dpo-missing-rejected-column", [DPO], ["p.jsonl: row 0 (line 1): missing column 'rejected'", "dataset.columns.rejected="],
         jsonl("p.jsonl", [{"prompt": "Q", "chosen": " a", "other": " b"}] * 3)),
    Case("dpo-null-prompt", [DPO], ["p.jsonl: row 2 (line 3): column 'prompt' is empty (null)", SKIP_ROW],
         jsonl("p.jsonl", PAIR_ROWS, set_row(2, prompt=None))),
    Case("kto-label-not-bool", [KTO], ["k.jsonl: row 3 (line 4): column 'label' must be true or false, got 'yes'", SKIP_ROW],
         jsonl("k.jsonl", KTO_ROWS, set_row(3, label="yes"))),
    Case("kto-label-number", [KTO], ["row 1 (line 2): column 'label' must be true or false, got 1", SKIP_ROW],
         jsonl("k.jsonl", KTO_ROWS, set_row(1, label=1))),
    Case("kto-empty-completion", [KTO], ["k.jsonl: row 2 (line 3): column 'completion' is empty", SKIP_ROW],
         jsonl("k.jsonl", KTO_ROWS, set_row(2, completion=""))),
    Case("kto-missing-label-column", [KTO], ["k.jsonl: row 0 (line 1): missing column 'label'", "dataset.columns.label="],
         jsonl("k.jsonl", [{"prompt": "Q", "completion": " A"}] * 4)),
    Case("ppo-row-without-prompt", [PPO], ["q.jsonl: row 1 (line 2): column 'prompt' is missing or null",
                                           "dataset.columns.prompt=", SKIP_ROW],
         jsonl("q.jsonl", PROMPT_ROWS, set_row(1, prompt=DELETE))),
    Case("ppo-empty-prompt", [PPO], ["q.jsonl: row 4 (line 5): column 'prompt' is empty", SKIP_ROW],
         jsonl("q.jsonl", PROMPT_ROWS, set_row(4, prompt=""))),
    Case("ppo-no-prompt-column", [PPO], ["q.jsonl: row 0 (line 1): no prompt column", "dataset.columns.prompt="],
         jsonl("q.jsonl", [{"question": "Q?"}] * 4)),
    Case("all-rows-invalid-even-skipped", [SFT, SKIP_ROW], ["t.jsonl", "no usable rows left"],
         jsonl("t.jsonl", [{"prompt": "Q", "completion": ""}] * 3)),
    # ---- bad inputs that were already clear: kept clear
    Case("typo-key", [SFT, "algo.packin=true"], ["algo.packin", "did you mean 'algo.packing'"]),
    Case("bad-type", [SFT, "train.lr=abc"], ["train.lr=abc"]),
    Case("unknown-preset", ["model=nope"], ["model=nope", "no such preset"]),
    Case("unknown-recipe", ["recipe=smoke/nope"], ["recipe=smoke/nope"]),
    Case("unknown-builtin-data", [SFT, "dataset.path=builtin:nope.jsonl"], ["builtin:nope.jsonl", "no such built-in data set"]),
    Case("missing-data-folder", [SFT, "dataset.path=./no/such/folder"], ["dataset.path=./no/such/folder", "no such file or directory"]),
    Case("hub-model-offline", [SFT, "model=llama"], ["model.name_or_path", "meta-llama/Llama-3.2-1B-Instruct"]),
    Case("model-path-missing", [SFT, "model.arch=null", "model.name_or_path=/nonexistent/model"],
         ["model.name_or_path=/nonexistent/model", "no such directory"]),
    Case("model-dir-not-a-model", [SFT, "model.arch=null"], ["is not a transformers model directory (no config.json)"],
         lambda t: [f"model.name_or_path={_mkdir(t / 'notes')}"]),
    Case("gguf-file-missing", [SFT, "model.arch=null", "model=smollm2", "model.gguf_file=/nonexistent/m.gguf"],
         ["model.gguf_file=/nonexistent/m.gguf", "no such file"]),
    Case("eval-fraction-out-of-range", [SFT, "dataset.eval_fraction=1.5"], ["dataset.eval_fraction=1.5"]),
    Case("truncation-mode", [SFT, "algo.truncation_mode=middle"], ["algo.truncation_mode", "middle"]),
    Case("prompt-length-vs-length", [DPO, "algo.max_prompt_length=64"], ["algo.max_prompt_length", "max_length"]),
    Case("generation-on-offline-algo", [SFT, "generation.max_new_tokens=5", "run.sample_prompts=0"],
         ["generation.max_new_tokens", "online algorithms", "with run.sample_prompts off"]),
    Case("reward-on-offline-algo", [DPO, "reward=length"], ["reward is used by online algorithms only"]),
    Case("qlora-without-gpu", [SFT, "peft=qlora"], ["peft=qlora", "CUDA GPU"],
         skip="a CUDA GPU is available here" if torch.cuda.is_available() else None),
    Case("cfg-flag", [SFT, "--cfg", "everything"], ["--cfg everything"]),
    Case("too-short-for-any-token", [SFT, "algo.max_length=1"], ["smoke_sft.jsonl: row", "no trained tokens left", "algo.max_length"]),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("not a model")
    return path


def run_case(case: Case, tmp_path: Path, capsys, model_dir: Optional[Path]):
    extra: List[str] = []
    if case.setup is not None:
        needs_model = getattr(case.setup, "needs_model", False) or case.setup.__code__.co_argcount == 2
        extra = case.setup(tmp_path, model_dir) if needs_model else case.setup(tmp_path)
    run_dir = tmp_path / "run"
    args = ["train", *case.args, *extra, *FAST, f"run.output_dir={run_dir}"]
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err, run_dir


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, tmp_path, capsys, request):
    if case.skip:
        pytest.skip(case.skip)
    needs_model = case.setup is not None and (
        getattr(case.setup, "needs_model", False) or case.setup.__code__.co_argcount == 2
    )
    model_dir = request.getfixturevalue("tiny_model_dir") if needs_model else None
    code, out, err, run_dir = run_case(case, tmp_path, capsys, model_dir)
    assert "Traceback" not in err + out, err
    assert code == case.code, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for expected in case.expect:
        assert expected in errors[0], f"{expected!r} not in: {errors[0]}"
    for expected in case.extra_stderr:
        assert expected in err, err
    # Nothing of a run was written: the refusal came before the run directory was touched.
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())


def test_trust_remote_code_warning_names_the_repository_once(tmp_path, capsys, tiny_model_dir):
    case = next(c for c in CASES if c.id == "trust-remote-code-warns-once")
    code, _, err, _ = run_case(case, tmp_path, capsys, tiny_model_dir)
    assert code == 2
    warnings = [line for line in err.splitlines() if "trust_remote_code" in line]
    assert len(warnings) == 1 and str(tmp_path / "model") in warnings[0], err


# --------------------------------------------------------------------------- what must keep working


def test_renames_apply_to_every_split_and_replace_a_same_named_column(tmp_path):
    from alignctl.config import DatasetConfig
    from alignctl.data.load import load_rows

    folder = tmp_path / "d"
    folder.mkdir()
    rows = [{"prompt": "old", "question": f"Q{i}?", "answer": f" A{i}."} for i in range(3)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(lines(rows))
    cfg = DatasetConfig(name="d", path=str(folder), eval_split="test",
                        columns={"prompt": "question", "completion": "answer"})
    split = load_rows(cfg, seed=0)
    for part in (split.train, split.eval):
        assert part[1].data == {"prompt": "Q1?", "completion": " A1."}
        assert part[1].source.endswith(".jsonl") and part[1].line == 2


def test_jsonl_reader_matches_a_table_reader(tmp_path):
    """Rows missing a key get None for it (as an Arrow table gives); blank lines are skipped; a JSON
    list in a .jsonl file and a columnar .json object are read too."""
    from alignctl.data.load import _read_file

    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1, "b": "x"}\n\n{"a": 2}\n{"b": "y\\u2028z", "c": [1]}\n', encoding="utf-8")
    records, numbers = _read_file(path)
    assert records == [{"a": 1, "b": "x", "c": None}, {"a": 2, "b": None, "c": None}, {"a": None, "b": "y\u2028z", "c": [1]}]
    assert numbers == [1, 3, 4]
    listed = tmp_path / "l.jsonl"
    listed.write_text(json.dumps([{"a": 1}, {"a": 2}], indent=2))
    assert _read_file(listed)[0] == [{"a": 1}, {"a": 2}]
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({"a": [1, 2], "b": ["x", "y"]}, indent=1))
    assert _read_file(columns)[0] == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_skip_invalid_skips_the_bad_row_and_trains(tmp_path, capsys):
    jsonl("t.jsonl", SFT_ROWS, set_row(2, completion=""))(tmp_path)
    code = main(["train", SFT, f"dataset.path={tmp_path / 't.jsonl'}", SKIP_ROW, "dataset.eval_fraction=0",
                 *FAST, f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped rows" in err and (tmp_path / "run" / "final_model").is_dir()


def test_tokenizer_only_folder_loads(tmp_path, tiny_model_dir):
    from alignctl.config import ModelConfig
    from alignctl.models.load import load_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(tiny_model_dir / name, folder / name)
    assert not (folder / "config.json").exists()
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), tokenizer_name_or_path=str(folder))
    assert load_tokenizer(cfg).pad_token is not None


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tiny_model_honours_attn_implementation(tiny_tokenizer, impl):
    from alignctl.config import ArchConfig, ModelConfig
    from alignctl.models.load import load_causal_lm

    cfg = ModelConfig(name_or_path="tiny", arch=ArchConfig(), attn_implementation=impl)
    model = load_causal_lm(cfg, tiny_tokenizer)
    assert model.config._attn_implementation == impl


def test_tiny_model_numbers_unchanged_by_default(tiny_tokenizer):
    """No attn_implementation builds exactly the model it always built (same weights, same outputs)."""
    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model

    a = build_tiny_model(ArchConfig(), tiny_tokenizer)
    b = build_tiny_model(ArchConfig(), tiny_tokenizer, attn_implementation="eager")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)
