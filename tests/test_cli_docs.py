"""Option docs and CLI discoverability (issue 13): `list GROUP=PRESET`, `explain`, `--version`,
"did you mean" for an override without its group."""

import re
from dataclasses import fields
from importlib import metadata

import pytest

from alignctl.algo_configs import CPOConfig, DPOConfig
from alignctl.cli import main
from alignctl.registry import ALGORITHMS
from alignctl.schema_docs import all_schemas, field_comments, iter_knobs


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_schema_field_has_a_meaning():
    missing = [
        f"{schema.__name__}.{knob.key}"
        for prefix, schema in all_schemas()
        for knob in iter_knobs(schema, None, prefix)
        if not knob.meaning
    ]
    assert not missing, "fields without a comment (add one above the field): " + ", ".join(missing)


def test_comments_are_read_from_the_source_and_inherited():
    meanings = field_comments(DPOConfig)
    assert meanings["beta"].startswith("Strength of the implicit KL constraint")
    # max_length is defined on the shared pairwise parent; DPO inherits its meaning.
    assert meanings["max_length"] == field_comments(DPOConfig.__mro__[1])["max_length"]
    assert "\n" not in meanings["loss_type"]  # a comment block becomes one line


def test_list_algo_dpo_shows_every_field_with_type_value_and_meaning(capsys):
    code, out, _ = run(capsys, "list", "algo=dpo")
    assert code == 0
    text = flat(out)
    meanings = field_comments(DPOConfig)
    for f in fields(DPOConfig):
        assert re.search(rf"algo\.{f.name}: \S.* = ", out), f"algo.{f.name} missing from `list algo=dpo`"
        assert flat(meanings[f.name]) in text, f"meaning of algo.{f.name} missing"
    assert "algo.beta: float = 0.1" in out
    assert re.search(r"algo\.loss_type: \S+ = sigmoid", out)
    assert "Direct Preference Optimisation" in text  # the preset's own description


def test_list_shows_the_preset_values_not_the_schema_defaults(capsys):
    code, out, _ = run(capsys, "list", "algo=simpo")
    assert code == 0
    assert "algo=simpo (CPOConfig)" in out
    assert "algo.beta: float = 2.0" in out and "algo.cpo_alpha: float = 0.0" in out
    assert CPOConfig().beta == 0.1


def test_list_sections_and_overrides(capsys):
    code, out, _ = run(capsys, "list", "train", "train.lr=3e-4")
    assert code == 0
    assert "train.lr: float = 0.0003" in out
    assert "Peak learning rate" in out
    code, out, _ = run(capsys, "list", "launcher=fsdp")
    assert code == 0 and "launcher.fsdp.sharding_strategy: str = " in out


@pytest.mark.parametrize("preset", ["sft", "kto", "ppo", "grpo", "ddpo"])
def test_list_every_kind_of_algorithm(capsys, preset):
    code, out, _ = run(capsys, "list", f"algo={preset}")
    assert code == 0
    schema = ALGORITHMS[preset].config_cls
    for f in fields(schema):
        assert f"algo.{f.name}:" in out


def test_list_catalogue_names_simpo_as_a_cpo_preset(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.strip("│ ").startswith("simpo"))
    assert "preset of cpo" in line
    for name in ALGORITHMS:
        assert name in out


def test_list_refuses_unknown_words(capsys):
    code, _, err = run(capsys, "list", "lr")
    assert code == 2 and "train.lr" in err
    code, _, err = run(capsys, "list", "algo=nope")
    assert code == 2 and "no such preset" in err


def test_explain_one_knob(capsys):
    code, out, _ = run(capsys, "explain", "train.lr")
    assert code == 0
    assert "train.lr: float = 5e-05" in out and "Peak learning rate" in out


def test_explain_an_algo_knob_in_every_algorithm_or_one(capsys):
    code, out, _ = run(capsys, "explain", "algo.beta")
    assert code == 0
    for preset, value in (("dpo", "0.1"), ("cpo", "0.1"), ("simpo", "2.0"), ("orpo", "0.1"), ("kto", "0.1"), ("grpo", "0.0")):
        assert f"algo={preset}: float = {value}" in out
    assert "algo=sft" not in out  # SFT has no beta
    code, out, _ = run(capsys, "explain", "algo.beta", "algo=orpo")
    assert code == 0
    assert "algo.beta: float = 0.1" in out and "odds-ratio" in out and "algo=dpo" not in out


def test_explain_unknown_keys_suggest(capsys):
    code, _, err = run(capsys, "explain", "train.lrr")
    assert code == 2 and "did you mean 'train.lr'" in err
    code, _, err = run(capsys, "explain", "algo.bta")
    assert code == 2 and "'algo.beta'" in err
    code, _, err = run(capsys, "explain", "lr")
    assert code == 2 and "train.lr" in err


@pytest.mark.parametrize("flag", ["--version", "-V", "version"])
def test_version(capsys, flag):
    code, out, _ = run(capsys, flag)
    assert code == 0
    assert out.strip() == f"alignctl {metadata.version('alignctl')}"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lr=1e-3", ["did you mean train.lr=1e-3?"]),
        ("beta=0.5", ["algo.beta=0.5 (algo dpo, cpo, orpo, kto, grpo)"]),
        ("max_length=64", ["one of:", "algo.max_length=64", "reward.max_length=64"]),
        ("hidden_size=32", ["model.arch.hidden_size=32"]),
    ],
)
def test_override_without_group_gets_did_you_mean(capsys, tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", override)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for words in expected:
        assert words in errors[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_unknown_bare_key_keeps_hydras_message(capsys):
    code, _, err = run(capsys, "train", "learning_rate=1e-3")
    assert code == 2 and "unknown config key 'learning_rate'" in err




def test_a_closed_pipe_ends_quietly():
    """The reader leaves before alignctl writes (`alignctl --help | true`, or `| head` on a long
    listing): no BrokenPipeError traceback."""
    import subprocess
    import sys

    for command in ("--help", "list algo=dpo"):
        reader = subprocess.run(f"{sys.executable} -m alignctl.cli {command} | true", shell=True,
                                capture_output=True, text=True, timeout=120)
        assert "Traceback" not in reader.stderr and "BrokenPipe" not in reader.stderr, (command, reader.stderr)
