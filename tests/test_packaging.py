"""The wheel is enough: built from this checkout, installed into a fresh virtual environment and run
from another folder, alignctl finds its configs and recipes (shipped inside the package) and trains."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# What `pip wheel` reads: the packaging files and the folders the wheel carries.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "alignctl", "configs", "recipes")


def _run(command, cwd, env, timeout=240):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, a working folder outside the checkout, environment) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("packaging")
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the checkout.
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNCTL_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source], tmp, env)
    (wheel,) = (tmp / "dist").glob("alignctl-*.whl")
    venv = tmp / "venv"
    # The venv sees this interpreter's packages (torch, transformers, pip, ...) but gets its own alignctl;
    # --ignore-installed: the checkout's editable install stays as it is, outside the venv.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, work, env


def test_wheel_ships_configs_and_recipes_and_uses_them(installed):
    bin_dir, work, env = installed
    probe = _run([bin_dir / "python", "-c", "import alignctl.compose as c; print(c.__file__); print(c.project_root())"], work, env)
    module, root = probe.stdout.split()
    venv = bin_dir.parent.resolve()
    assert Path(module).resolve().is_relative_to(venv), f"imported {module}, not the installed copy"
    assert Path(root) == Path(module).parent, "configs are not read from inside the installed package"
    assert (Path(root) / "configs" / "train.yaml").is_file() and (Path(root) / "recipes" / "smoke" / "dpo.yaml").is_file()

    listing = _run([bin_dir / "alignctl", "list"], work, env)
    assert "smoke/dpo" in listing.stdout and "smoke_pref" in listing.stdout


def test_installed_alignctl_trains_a_smoke_recipe_from_another_folder(installed):
    bin_dir, work, env = installed
    out = work / "run"
    _run([bin_dir / "alignctl", "train", "recipe=smoke/dpo", "train.max_steps=2", f"run.output_dir={out}"], work, env)
    assert (out / "final_model" / "config.json").is_file()
    assert (out / "config.yaml").is_file()
    assert not (work / "runs").exists()  # run.output_dir was used as given
