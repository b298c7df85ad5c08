"""Shipped dataset presets and recipes (issue 12, part C).

- every dataset preset and every recipe composes and passes the config checks (nothing runs);
- nothing shipped (configs/, recipes/, README) refers to a path outside the repository;
- each public data set's preset parses rows written exactly in that data set's hub schema (its
  column names, value kinds and split names), through the same loading and building code a run uses;
- a hub data set that cannot be reached is one clear error, fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from alignctl.algo_configs import SFTConfig
from alignctl.cli import main
from alignctl.compose import compose_job, list_presets, list_recipes
from alignctl.data.encode import render_chat_completion
from alignctl.data.kto import build_kto_examples
from alignctl.data.load import Row, load_rows
from alignctl.data.pairwise import build_pair_examples
from alignctl.data.prompts import build_prompt_examples
from alignctl.data.sft import build_sft_examples
from alignctl.errors import ConfigError, DataError
from alignctl.models.tiny import _strings, build_tiny_tokenizer  # _strings: every string value of a document
from alignctl.registry import get_algorithm
from alignctl.validate import validate_job
from conftest import ROOT

# preset -> (an algorithm that reads it, its hub id)
PUBLIC = {
    "hh-rlhf": ("dpo", "Anthropic/hh-rlhf"),
    "ultrafeedback_binarized": ("dpo", "HuggingFaceH4/ultrafeedback_binarized"),
    "ultrachat_200k": ("sft", "HuggingFaceH4/ultrachat_200k"),
    "kto-mix-14k": ("kto", "trl-lib/kto-mix-14k"),
    "tldr": ("grpo", "trl-lib/tldr"),
}
PAIR = dict(max_length=256, max_prompt_length=128, truncation_mode="keep_end")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def checked(overrides):
    """Compose, then every config-only check `alignctl train` runs before anything is loaded."""
    job = compose_job(overrides)
    validate_job(job)
    get_algorithm(job.algo.name).check(job)
    return job


# --------------------------------------------------------------------------- presets and recipes


# The shipped presets that are not SFT data -> the overrides of an algorithm that reads them.
READERS = {
    "smoke_pref": ["algo=dpo"], "smoke_pref_chat": ["algo=dpo"], "smoke_kto": ["algo=kto"],
    "smoke_prompts": ["algo=grpo", "reward=length"], "arithmetic": ["algo=grpo", "reward=arithmetic"],
    "smoke_image_prompts": ["algo=ddpo", "model=tiny_sd", "reward=jpeg_compressibility"],
    **{name: [f"algo={algo}"] + (["reward=length"] if algo == "grpo" else []) for name, (algo, _) in PUBLIC.items()},
}


@pytest.mark.parametrize("preset", list_presets("dataset"))
def test_every_dataset_preset_passes_the_checks(preset):
    job = checked([*READERS.get(preset, ["algo=sft"]), f"dataset={preset}"])
    assert job.dataset.name == preset


@pytest.mark.parametrize("preset", sorted(PUBLIC))
def test_public_presets_name_their_hub_ids(preset):
    assert preset in list_presets("dataset")
    assert compose_job([f"dataset={preset}"]).dataset.path == PUBLIC[preset][1]


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_passes_the_checks(recipe, tmp_path):
    # The PPO example's reward model comes from the command line (a run directory of step 1).
    extra = []
    if recipe.endswith("ppo_smollm2"):
        from transformers import LlamaConfig

        LlamaConfig(num_labels=1, architectures=["LlamaForSequenceClassification"]).save_pretrained(tmp_path)
        extra = [f"reward.model={tmp_path}"]
    assert checked([f"recipe={recipe}", *extra]).algo.name


def _shipped_yaml():
    return sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yaml"))



# A path into a parent folder ("../data", not the "..." of an elided path nor "../" alone in prose),
# this machine's folders, installed packages.
OUTSIDE = re.compile(r"(?<!\.)\.\./[\w.~-]|/work/|/root/|shared/data|site-packages")


def outside_paths(text):
    return [m.group(0) for m in OUTSIDE.finditer(text)]


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shipped_config_refers_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    assert not outside_paths(text), f"{path.relative_to(ROOT)} mentions {outside_paths(text)}"
    for value in _strings(yaml.safe_load(text)):
        assert not value.startswith(("/", "~")), f"{path.relative_to(ROOT)} holds the absolute path {value!r}"


def test_readme_refers_to_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not outside_paths(text), f"README.md mentions {outside_paths(text)}"
    assert outside_paths("dataset.path=../data x /work/a") == ["../d", "/work/"]
    assert not outside_paths("runs/ddpo-.../final_model, a path starting with `../`")


# --------------------------------------------------------------------------- hub schemas, parsed


def msg(role, content):
    return {"content": content, "role": role}  # the hub's key order


def write_splits(folder: Path, splits: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def load_preset(preset, folder, *overrides):
    job = compose_job([f"dataset={preset}", f"dataset.path={folder}", *overrides])
    return load_rows(OmegaConf.to_object(job.dataset), seed=0)


def hh_row(i):
    start = f"\n\nHuman: How do I fix thing {i}?\n\nAssistant:"
    return {"chosen": f"{start} Carefully, step {i}.", "rejected": f"{start} No idea {i}."}


def test_hh_rlhf_raw_pairs_and_sft_on_chosen(tmp_path, tok):
    folder = write_splits(tmp_path / "hh", {"train": [hh_row(i) for i in range(4)], "test": [hh_row(i) for i in range(9, 12)]})
    split = load_preset("hh-rlhf", folder, "dataset.max_eval_rows=2")
    assert len(split.train) == 4 and len(split.eval) == 2
    assert split.eval_origin == "split 'test', its first 2 rows (dataset.max_eval_rows)"
    pairs = build_pair_examples(split.train, tok, **PAIR)
    assert pairs.format == "chosen_rejected"
    first = pairs.examples[0]
    assert tok.decode(first.prompt_ids).endswith("Assistant:")
    assert tok.decode(first.chosen_ids).startswith(" Carefully")
    sft = load_preset("hh-rlhf", folder, "dataset.columns.text=chosen")
    data = build_sft_examples(sft.train, tok, SFTConfig(max_length=128), skip_invalid=False)
    assert data.format == "text" and len(data.examples) == 4


def uf_row(i):
    question = f"What is {i} plus {i}?"
    chosen = [msg("user", question), msg("assistant", f"It is {2 * i}.")]
    rejected = [msg("user", question), msg("assistant", "No clue.")]
    return {"prompt": question, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0}


def test_max_eval_rows_must_be_positive():
    with pytest.raises(ConfigError, match=r"dataset.max_eval_rows=0: must be >= 1"):
        validate_job(compose_job(["dataset.max_eval_rows=0"]))


def test_ultrafeedback_binarized_conversations_with_a_string_prompt(tmp_path, tok):
    folder = write_splits(tmp_path / "uf", {"train_prefs": [uf_row(i) for i in range(3)], "test_prefs": [uf_row(7)]})
    split = load_preset("ultrafeedback_binarized", folder)
    assert len(split.train) == 3 and len(split.eval) == 1
    pairs = build_pair_examples(split.train, tok, **PAIR)
    assert pairs.format == "chosen_rejected_chat"
    # The same ids as the explicit layout: prompt = the user turn, answers = the assistant turns.
    for row, example in zip(split.train, pairs.examples):
        prompt, answer = row.data["chosen"][:1], row.data["chosen"][1:]
        explicit = Row(index=row.index, data={"prompt": prompt, "chosen": answer, "rejected": row.data["rejected"][1:]})
        expected = build_pair_examples([explicit], tok, **PAIR).examples[0]
        assert (example.prompt_ids, example.chosen_ids, example.rejected_ids) == (
            expected.prompt_ids, expected.chosen_ids, expected.rejected_ids)
        prompt_text, _ = render_chat_completion(tok, prompt, answer, row.index)
        assert tok.decode(example.prompt_ids) == prompt_text
    kto = build_kto_examples(split.train, tok, **PAIR)
    assert kto.format == "chosen_rejected_chat -> unpaired" and kto.num_desirable == kto.num_undesirable == 3


def test_ultrachat_200k_messages(tmp_path, tok):
    def row(i):
        turns = [msg("user", f"Tell me about {i}."), msg("assistant", f"{i} is a number."),
                 msg("user", "More?"), msg("assistant", f"{i + 1} follows it.")]
        return {"prompt": turns[0]["content"], "prompt_id": f"{i:064x}", "messages": turns}

    folder = write_splits(tmp_path / "uc", {"train_sft": [row(i) for i in range(3)], "test_sft": [row(5)]})
    split = load_preset("ultrachat_200k", folder)
    data = build_sft_examples(split.train, tok, SFTConfig(max_length=256), skip_invalid=False)
    assert data.format == "messages"
    trained = [t for t, label in zip(data.examples[0].input_ids, data.examples[0].labels) if label != -100]
    assert "0 is a number." in tok.decode(trained) and "Tell me" not in tok.decode(trained)


def test_kto_mix_14k_unpaired_messages(tmp_path, tok):
    def row(i):
        return {"prompt": [msg("user", f"Question {i}?")], "completion": [msg("assistant", f"Answer {i}.")],
                "label": i % 2 == 0}

    folder = write_splits(tmp_path / "kto", {"train": [row(i) for i in range(4)], "test": [row(8), row(9)]})
    split = load_preset("kto-mix-14k", folder)
    data = build_kto_examples(split.train, tok, **PAIR)
    assert data.format == "prompt_completion_label_chat"
    assert [e.label for e in data.examples] == [True, False, True, False]


def test_tldr_prompts(tmp_path, tok):
    def row(i):
        post = f"SUBREDDIT: r/test\n\nTITLE: Post {i}\n\nPOST: Something happened {i} times.\n\nTL;DR:"
        return {"prompt": post, "completion": f" it happened {i} times"}

    folder = write_splits(tmp_path / "tldr", {"train": [row(i) for i in range(3)], "validation": [row(4)]})
    split = load_preset("tldr", folder)
    assert split.eval is None  # online algorithms do not evaluate
    data = build_prompt_examples(split.train, tok, max_prompt_length=128)
    assert data.format == "prompt" and data.examples[0].prompt_text.endswith("TL;DR:")
    assert data.examples[0].columns == {"completion": " it happened 0 times"}


def test_ultrafeedback_layout_trains_one_step(tmp_path, capsys):
    folder = write_splits(tmp_path / "uf", {"train_prefs": [uf_row(i) for i in range(4)], "test_prefs": [uf_row(9)]})
    code = main(["train", "algo=dpo", "model=tiny", "dataset=ultrafeedback_binarized", f"dataset.path={folder}",
                 "train.max_steps=1", "train.per_device_batch_size=2", "train.save_steps=0", "run.progress=false",
                 f"run.output_dir={tmp_path / 'run'}"])
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("split") == "eval" for m in metrics)


# --------------------------------------------------------------------------- the hub, unreachable


def test_unreachable_hub_is_one_clear_line(monkeypatch):
    import datasets
    from huggingface_hub import constants

    cfg = OmegaConf.to_object(compose_job(["dataset=ultrafeedback_binarized"]).dataset)
    datasets_offline = datasets.config.HF_HUB_OFFLINE
    for offline, endpoint, why in ((True, constants.ENDPOINT, "HF_HUB_OFFLINE is set"),
                                   (False, "https://hub.invalid", "hub.invalid does not resolve")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        with pytest.raises(DataError) as caught:
            load_rows(cfg, seed=0)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith("dataset.path=HuggingFaceH4/ultrafeedback_binarized:")
        assert why in message and "train_prefs.jsonl" in message
        # The offline switch is for that one call only.
        assert constants.HF_HUB_OFFLINE is offline and datasets.config.HF_HUB_OFFLINE is datasets_offline


def test_fsdp_recipe_builds_its_launch_command_offline(tmp_path, capsys):
    code = main(["train", "recipe=llama3.2-1b/dpo_lora_fsdp", "--dry-run", f"run.output_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    assert "accelerate launch" in capsys.readouterr().out
    accelerate = yaml.safe_load((tmp_path / "accelerate_config.yaml").read_text())
    assert accelerate["distributed_type"] == "FSDP" and accelerate["num_processes"] == 2
    assert "LlamaDecoderLayer" in json.dumps(accelerate)
