"""Config composition: presets, overrides, recipes, and the one-line errors for bad input."""

import pytest

from alignctl.compose import GROUPS, compose_job, list_presets, list_recipes
from alignctl.errors import ConfigError
from conftest import run_cli


@pytest.mark.parametrize("group", GROUPS)
def test_every_preset_composes(group):
    presets = list_presets(group)
    assert presets, f"group {group} has no presets"
    for preset in presets:
        cfg = compose_job([f"{group}={preset}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes(recipe):
    cfg = compose_job([f"recipe={recipe}"])
    assert cfg.algo.name


def test_overrides_apply_and_are_typed():
    cfg = compose_job(["train.lr=1e-3", "algo.packing=true", "train.max_steps=7"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.algo.packing is True
    assert cfg.train.max_steps == 7


def test_recipe_sets_values_and_command_line_wins():
    cfg = compose_job(["recipe=smoke/sft"])
    assert cfg.train.max_steps == 30 and cfg.model.arch is not None
    cfg = compose_job(["recipe=smoke/sft", "train.max_steps=3"])
    assert cfg.train.max_steps == 3


def test_hub_presets_name_hub_ids():
    assert compose_job(["model=llama"]).model.name_or_path.startswith("meta-llama/")
    assert compose_job(["model=smollm2"]).model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.betta=0.1", "unknown config key 'algo.betta'"),
        ("train.lrr=0.1", "did you mean 'train.lr'"),
        ("train.lr=abc", "train.lr=abc: expected a value of type float"),
        ("train.max_steps=1.5", "train.max_steps=1.5: expected a value of type integer"),
        ("algo.packing=maybe", "algo.packing=maybe: expected a value of type bool"),
        ("model=nope", "model=nope: no such preset in group 'model'; choose one of: llama, qwen, sd15, smollm2, tiny, tiny_sd"),
        ("recipe=smoke/nope", "recipe=smoke/nope: no such recipe"),
        ("bogus=1", "unknown config key 'bogus'"),
    ],
)
def test_bad_overrides_name_the_problem(override, expected):
    with pytest.raises(ConfigError) as info:
        compose_job([override])
    assert expected in str(info.value)


def test_unknown_algo_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        compose_job(["algo.betta=0.1"])
    assert "max_length" in str(info.value) and "packing" in str(info.value)


def test_cli_cfg_job_prints_config_without_running(tmp_path):
    result = run_cli("train", "algo=sft", "train.lr=0.25", f"run.output_dir={tmp_path / 'never'}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.25" in result.stdout and "name: sft" in result.stdout
    assert not (tmp_path / "never").exists()


def test_cli_bad_override_is_one_line_without_traceback():
    result = run_cli("train", "train.lr=abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.lr=abc" in result.stderr


def test_cli_hub_model_offline_fails_fast_with_one_clear_line(tmp_path):
    result = run_cli("train", "algo=sft", "model=llama", f"run.output_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "meta-llama/Llama-3.2-1B-Instruct" in result.stderr
    assert "model.name_or_path" in result.stderr


def test_cli_missing_local_model_path(tmp_path):
    result = run_cli("train", f"model.name_or_path={tmp_path}/nothing-here", "model.arch=null")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such directory" in result.stderr


def test_cli_list_shows_registry_presets_and_recipes():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    for word in ("sft", "smoke/sft", "tiny", "smollm2", "lora", "bf16", "local"):
        assert word in result.stdout


def test_column_renames_can_be_added_on_the_command_line():
    cfg = compose_job(["dataset.columns.prompt=question", "dataset.columns.completion=answer"])
    assert dict(cfg.dataset.columns) == {"prompt": "question", "completion": "answer"}


def test_cli_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_cli("train", f"model.name_or_path={tmp_path}", "model.arch=null", f"run.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a transformers model directory (no config.json)" in result.stderr
