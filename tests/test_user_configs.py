"""Users' own configs: a recipe by path, a config folder (--config-dir), repeating a run (--from),
`alignctl cp` and `alignctl validate`, and ALIGNCTL_HOME."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from alignctl.cli import main
from alignctl.compose import compose_job, list_recipes, project_root
from alignctl.errors import ConfigError
from alignctl.run_dir import config_text, write_config
from conftest import ROOT

TINY_PRESET = """\
name_or_path: tiny
arch:
  hidden_size: 32
  intermediate_size: 64
  num_hidden_layers: 1
  num_attention_heads: 2
  num_key_value_heads: 1
  max_position_embeddings: 256
  vocab_size: 512
  init_seed: 1
"""


def cli(*args, cwd, timeout=300):
    """The real entry point in a subprocess, run from ``cwd`` (relative paths are the user's)."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "alignctl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def without_run(config):
    """A composed config as plain data, less the run's own place (differs between a run and its repeat)."""
    data = yaml.safe_load(config_text(config)) if not isinstance(config, dict) else dict(config)
    data["run"] = {k: v for k, v in data["run"].items() if k != "output_dir"}
    return data


# ---------------------------------------------------------------------------------------- recipe by path
def test_recipe_by_relative_path_composes_with_typed_algo_fields(tmp_path, monkeypatch):
    (tmp_path / "exps").mkdir()
    # plain YAML without a defaults list: algo.name picks the algorithm's preset (and schema)
    (tmp_path / "exps" / "exp.yaml").write_text("algo:\n  name: dpo\n  beta: 0.3\ntrain:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    cfg = compose_job(["recipe=./exps/exp.yaml", "dataset=smoke_pref", "train.max_steps=5"])
    assert cfg.algo.name == "dpo" and cfg.algo.beta == pytest.approx(0.3)
    assert cfg.algo.loss_type == "sigmoid"  # the rest of the dpo preset
    assert cfg.train.max_steps == 5  # the command line wins over the recipe
    with pytest.raises(ConfigError, match="unknown config key 'algo.betta'"):
        compose_job(["recipe=exps/exp.yaml", "algo.betta=1"])


def test_a_copied_recipe_runs_like_the_shipped_one(tmp_path):
    dest = tmp_path / "mine" / "dpo.yaml"
    assert main(["cp", "recipe", "smoke/dpo", str(dest)]) == 0
    assert dest.read_text() == (project_root() / "recipes" / "smoke" / "dpo.yaml").read_text()
    assert without_run(compose_job([f"recipe={dest}"])) == without_run(compose_job(["recipe=smoke/dpo"]))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.yaml", None, "recipe=DIR/missing.yaml: no such file"),
        ("folder.yaml", "DIR", "not a file"),
        ("exp.json", "{}", "a recipe file must be YAML"),
        ("bad.yaml", "train: [1, 2\n", "cannot read it as YAML"),
        ("list.yaml", "- 1\n- 2\n", "holds a list or a single value"),
    ],
)
def test_bad_recipe_files_are_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        compose_job([f"recipe={path}"])
    assert message.replace("DIR", str(tmp_path)) in str(info.value)


# ---------------------------------------------------------------------------------------- --config-dir
@pytest.fixture
def config_dir(tmp_path):
    folder = tmp_path / "my_configs"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "mine.yaml").write_text(TINY_PRESET)
    (folder / "exps").mkdir()
    recipe = (ROOT / "recipes" / "smoke" / "dpo.yaml").read_text().replace("max_steps: 30", "max_steps: 4")
    (folder / "my_exp.yaml").write_text(recipe)
    (folder / "exps" / "sft.yaml").write_text("# @package _global_\ntrain:\n  max_steps: 6\n")
    return folder


def test_config_dir_adds_recipes_and_group_presets(config_dir):
    cfg = compose_job([f"--config-dir={config_dir}", "recipe=my_exp", "model=mine"])
    assert cfg.algo.name == "dpo" and cfg.train.max_steps == 4 and cfg.model.arch.hidden_size == 32
    nested = compose_job([f"--config-dir={config_dir}", "recipe=exps/sft"])
    assert nested.algo.name == "sft" and nested.train.max_steps == 6
    # shipped presets and recipes stay available beside the folder's
    assert compose_job([f"--config-dir={config_dir}", "recipe=smoke/kto"]).algo.name == "kto"


def test_config_dir_errors_name_the_problem(config_dir, tmp_path):
    with pytest.raises(ConfigError, match="--config-dir .*nope: no such directory"):
        compose_job([f"--config-dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError) as info:
        compose_job([f"--config-dir={config_dir}", "model=mien"])
    assert "model=mien: no such preset" in str(info.value) and "mine (in --config-dir" in str(info.value)
    (config_dir / "model" / "tiny.yaml").write_text(TINY_PRESET)
    with pytest.raises(ConfigError, match=r"model/tiny.yaml has the name of a shipped preset \(model=tiny\)"):
        compose_job([f"--config-dir={config_dir}"])
    (config_dir / "model" / "tiny.yaml").unlink()
    (config_dir / "smoke").mkdir()
    (config_dir / "smoke" / "dpo.yaml").write_text("train:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=r"smoke/dpo.yaml has the name of a shipped recipe"):
        compose_job([f"--config-dir={config_dir}"])


def test_cli_config_dir_and_recipe_path_are_relative_to_the_working_folder(config_dir, tmp_path):
    """train accepts `--config-dir DIR`; launch-cmd's printed command (what every launched process
    and other machines run) carries absolute paths, and composing it elsewhere gives the same config."""
    shutil.copy(config_dir / "my_exp.yaml", tmp_path / "exp.yaml")
    run_dir = tmp_path / "run"
    result = cli("launch-cmd", "--config-dir", "my_configs", "model=mine", "recipe=./exp.yaml", "launcher=ddp",
                 f"run.output_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout.strip())
    child = words[words.index("train") + 1:]
    assert f"--config-dir={config_dir}" in child and f"recipe={tmp_path / 'exp.yaml'}" in child
    assert yaml.safe_load(config_text(compose_job(child))) == yaml.safe_load((run_dir / "config.yaml").read_text())


# ---------------------------------------------------------------------------------------- --from
def saved_run(tmp_path, overrides):
    """A run directory as a run leaves it, as far as --from reads it (config.yaml)."""
    run_dir = tmp_path / "old"
    write_config(compose_job([*overrides, f"run.output_dir={run_dir}"]), run_dir)
    return run_dir


def test_from_run_composes_its_saved_config_plus_overrides(tmp_path):
    run_dir = saved_run(tmp_path, ["recipe=smoke/dpo", "dataset.columns.prompt=question", "algo.beta=0.2"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    again = compose_job([f"--from={run_dir}"])
    assert without_run(again) == without_run(saved)
    assert again.run.output_dir is None and again.resume is None  # a new run directory, never the old one
    changed = compose_job([f"--from={run_dir}", "train.lr=0.5", "algo.loss_type=ipo"])
    assert changed.train.lr == 0.5 and changed.algo.loss_type == "ipo" and changed.algo.beta == pytest.approx(0.2)
    # a group picked on the command line replaces the saved group instead of being overwritten by it
    other = compose_job([f"--from={run_dir}", "dataset=smoke_pref_chat"])
    assert other.dataset.name == "smoke_pref_chat" and dict(other.dataset.columns) == {}


def test_from_run_keeps_environment_values_unresolved(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCTL_TEST_DATA", "builtin:smoke_pref.jsonl")
    run_dir = saved_run(tmp_path, ["recipe=smoke/dpo", "dataset.path=${oc.env:ALIGNCTL_TEST_DATA}"])
    assert "${oc.env:ALIGNCTL_TEST_DATA}" in (run_dir / "config.yaml").read_text()
    again = compose_job([f"--from={run_dir}"])
    assert again.dataset.path == "builtin:smoke_pref.jsonl"
    assert "${oc.env:ALIGNCTL_TEST_DATA}" in config_text(again)


def test_from_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        compose_job([f"--from={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="holds no config.yaml, so it is not an alignctl run directory"):
        compose_job([f"--from={tmp_path}"])
    run_dir = saved_run(tmp_path, ["recipe=smoke/sft"])
    with pytest.raises(ConfigError, match="--from .* and recipe= both give a whole experiment"):
        compose_job([f"--from={run_dir}", "recipe=smoke/dpo"])
    (run_dir / "config.yaml").write_text("train:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="has no algo.name"):
        compose_job([f"--from={run_dir}"])
    assert main(["train", "--from"]) == 2


def test_cli_repeat_trains_into_a_new_directory_and_leaves_the_old_run(tmp_path):
    run_dir = saved_run(tmp_path, ["recipe=smoke/sft"])
    before = sorted(p.name for p in run_dir.iterdir())
    new = tmp_path / "new"
    result = cli("train", "--from", "old", "train.max_steps=2", f"run.output_dir={new}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"repeating {run_dir} (its config.yaml, 2 override(s))" in result.stderr
    assert f"{run_dir} is left as it is" in result.stderr
    assert (new / "final_model").is_dir() and sorted(p.name for p in run_dir.iterdir()) == before
    saved, repeated = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, new))
    assert repeated["train"].pop("max_steps") == 2 and saved["train"].pop("max_steps") == 30
    assert without_run(repeated) == without_run(saved)


# ---------------------------------------------------------------------------------------- validate
def test_validate_prints_a_summary_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "recipe=smoke/dpo", "run.output_dir=out"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK")
    assert "dpo (loss_type sigmoid)" in out and "built-in random model" in out and "out (new)" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", [name for name in list_recipes() if name.startswith("smoke/")])
def test_every_smoke_recipe_validates_offline(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", f"recipe={recipe}"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("config OK") and "nothing to download" in out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=-1"], "train.lr=-1.0: must be > 0"),
        (["train.lr=abc"], "train.lr=abc: expected a value of type float"),
        (["dataset.path=./no/such.jsonl"], "no/such.jsonl"),
        (["model=smollm2"], "HuggingFaceTB/SmolLM2-135M-Instruct: hub id not in the local Hugging Face cache"),
        (["model=smollm2", "model.name_or_path=./nowhere"], "model.name_or_path=./nowhere: no such directory"),
        (["model=smollm2", "model.name_or_path=DIR"], "the folder holds no model"),
        (["launcher=ddp", "launcher.num_processes=1"], "launcher=ddp needs at least 2 processes"),
    ],
    ids=["range", "type", "data-file", "hub-offline", "local-missing", "not-a-model", "launcher"],
)
def test_validate_errors_are_one_line(tmp_path, monkeypatch, capsys, overrides, message):
    monkeypatch.chdir(tmp_path)
    overrides = [o.replace("DIR", str(tmp_path)) for o in overrides]
    assert main(["validate", "recipe=smoke/dpo", *overrides]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "config OK" not in captured.out, captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_validate_a_local_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["validate", "model=smollm2", f"model.name_or_path={tmp_path}"]) == 0
    assert f"{tmp_path} (local)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- cp
def test_cp_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "exp.yaml"
    dest.write_text("mine")
    assert main(["cp", "recipe", "smoke/sft", str(dest)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and dest.read_text() == "mine"
    assert main(["cp", "recipe", "smoke/sft", str(dest), "--force"]) == 0
    assert "alignctl train recipe=" in capsys.readouterr().err
    assert dest.read_text() == (project_root() / "recipes" / "smoke" / "sft.yaml").read_text()
    # a destination that cannot be written is one clear line, not a traceback
    assert main(["cp", "recipe", "smoke/sft", str(dest / "sub" / "x.yaml")]) == 2
    assert "cp: cannot write" in capsys.readouterr().err


def test_cp_into_a_folder_and_a_preset_into_a_config_dir(tmp_path, capsys):
    assert main(["cp", "recipe", "smoke/kto", str(tmp_path)]) == 0
    assert (tmp_path / "kto.yaml").is_file()
    dest = tmp_path / "cfg" / "model" / "small"  # .yaml is added
    assert main(["cp", "model/tiny", str(dest)]) == 0
    assert f"--config-dir {tmp_path / 'cfg'} model=small" in capsys.readouterr().err
    assert compose_job([f"--config-dir={tmp_path / 'cfg'}", "model=small"]).model.arch.hidden_size == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe", "smoke/nope", "x.yaml"], "recipe smoke/nope: no such recipe; choose one of"),
        (["modl/tiny", "x.yaml"], "no config group 'modl'"),
        (["model/huge", "x.yaml"], "model/huge: no such preset; choose one of"),
        (["recipe", "smoke/sft", "x.json"], "a config file must end in .yaml"),
        (["recipe", "smoke/sft"], "use alignctl cp recipe NAME DEST"),
    ],
)
def test_cp_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", *args]) == 2
    assert message in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- ALIGNCTL_HOME
def test_alignctl_home_replaces_the_shipped_folders(tmp_path, monkeypatch):
    for name in ("configs", "recipes"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / "recipes" / "team").mkdir()
    (tmp_path / "recipes" / "team" / "base.yaml").write_text("# @package _global_\ntrain:\n  max_steps: 9\n")
    monkeypatch.setenv("ALIGNCTL_HOME", str(tmp_path))
    assert project_root() == tmp_path and "team/base" in list_recipes()
    assert compose_job(["recipe=team/base"]).train.max_steps == 9
    monkeypatch.setenv("ALIGNCTL_HOME", str(tmp_path / "recipes"))
    with pytest.raises(ConfigError, match="holds no configs/train.yaml"):
        project_root()
