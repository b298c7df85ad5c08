"""Hydra composition: argv overrides -> one typed, validated JobConfig.

Hydra's own errors are accurate but long; ``compose_job`` turns them into one ConfigError line
that names the key or value and the valid choices.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Sequence

from omegaconf import DictConfig, OmegaConf

from alignctl.config import JobConfig
from alignctl.errors import ConfigError

GROUPS = ("algo", "model", "dataset", "peft", "precision", "launcher", "generation", "reward")


def project_root() -> Path:
    """Folder holding configs/ and recipes/: ALIGNCTL_HOME if set, else the source checkout this
    package sits in, else the copy an installed wheel carries inside the package (setup.py)."""
    env = os.environ.get("ALIGNCTL_HOME")
    if env:
        home = Path(env).expanduser()
        if not (home / "configs" / "train.yaml").is_file():
            raise ConfigError(
                f"ALIGNCTL_HOME={env}: holds no configs/train.yaml; point it at a folder with alignctl's "
                "configs/ and recipes/ (e.g. a source checkout), or unset it"
            )
        return home
    package = Path(__file__).resolve().parent
    for root in (package.parent, package):  # checkout first: a stale build copy never wins over it
        if (root / "configs" / "train.yaml").is_file() and (root / "recipes").is_dir():
            return root
    raise ConfigError(
        f"alignctl's configs/ and recipes/ are missing (looked in {package.parent} and {package}); "
        "reinstall alignctl, or set ALIGNCTL_HOME to a source checkout"
    )


def configs_dir() -> Path:
    return project_root() / "configs"


def recipes_dir() -> Path:
    return project_root() / "recipes"


def list_presets(group: str) -> List[str]:
    folder = configs_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def list_recipes() -> List[str]:
    root = recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def register_schemas() -> None:
    """Put the schemas and the recipes into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from alignctl.registry import ALGORITHMS

    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    for algorithm in ALGORITHMS.values():
        store.store(group="schema/algo", name=algorithm.name, node=algorithm.config_cls)
    # Recipes live outside configs/ (a top-level folder); store each as option `recipe=<sub/name>`.
    for name in list_recipes():
        sub, _, leaf = name.rpartition("/")
        group = "recipe/" + sub if sub else "recipe"
        node = OmegaConf.load(recipes_dir() / f"{name}.yaml")
        store.store(group=group, name=leaf, node=node, package="_global_")


def compose_job(overrides: Sequence[str]) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line overrides; raise ConfigError on bad input.

    ``overrides`` may also hold ``--config-dir=DIR`` and ``--from=RUN_DIR`` and name a recipe by its
    file (alignctl.user_configs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from alignctl.user_configs import parse_sources

    sources = parse_sources(overrides, GROUPS, list_presets, list_recipes())
    _check_group_choices([o for o in sources.overrides if not sources.claims(o)])
    overrides = [_allow_new_map_key(o) for o in sources.hydra_overrides(GROUPS)]
    register_schemas()
    sources.register(GROUPS)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs_dir()), version_base=None):
            cfg = compose(config_name="train", overrides=list(overrides))
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "bad override"
        where = f" (composing {sources.from_run}/config.yaml, given with --from)" if sources.from_run else ""
        raise ConfigError(explain_compose_error(exc) + where) from None
    finally:
        GlobalHydra.instance().clear()
    from alignctl.precision import resolve_auto_precision

    return resolve_auto_precision(cfg)


# Free-form maps (column renames): a key a preset does not set yet is added, not refused.
OPEN_MAPS = ("dataset.columns.",)


def _allow_new_map_key(override: str) -> str:
    if override.startswith(OPEN_MAPS):
        return "++" + override
    return override


def _check_group_choices(overrides: Sequence[str]) -> None:
    """`model=nope`: say which presets exist before Hydra prints its search path."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep:
            continue
        if key in GROUPS and value not in list_presets(key):
            raise ConfigError(
                f"{key}={value}: no such preset in group '{key}'; choose one of: "
                + ", ".join(list_presets(key))
            )
        if key == "recipe" and value not in ("null", *list_recipes()):
            raise ConfigError(
                f"recipe={value}: no such recipe; choose one of: " + ", ".join(list_recipes())
            )
        if "." not in key and key not in GROUPS and key != "recipe":
            hint = bare_key_message(key, value)
            if hint:
                raise ConfigError(hint)


def bare_key_message(key: str, value: str | None) -> str | None:
    """`lr=1e-3` -> "did you mean train.lr=1e-3": every schema field whose name is ``key``.

    None when ``key`` is a top-level key itself or no field is called so (Hydra's own message,
    with close spellings, follows)."""
    from alignctl.schema_docs import leaf_matches

    matches = {full: algos for full, algos in leaf_matches(key).items() if full != key}
    if not matches or key in {f.name for f in fields(JobConfig)}:
        return None
    setting = f"={value}" if value is not None else ""
    shown = [
        full + setting + (f" (algo {', '.join(algos)})" if algos else "") for full, algos in matches.items()
    ]
    choice = shown[0] if len(shown) == 1 else "one of: " + "; ".join(shown)
    return f"{key}{setting}: there is no top-level key '{key}'; did you mean {choice}?"


def explain_compose_error(exc: BaseException) -> str:
    """One line naming the bad key or value and what would be valid."""
    chain = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(str(e) for e in chain)

    full_key = _search(r"full_key: (\S+)", text)
    missing_key = _search(r"Key '([^']+)' not in", text) or _search(r"Could not override '([^']+)'", text)
    object_type = _search(r"object_type=(\w+)", text)
    if "not in" in text and full_key:
        return _unknown_key_message(full_key, object_type)
    if "No match in config" in text or ("Could not override" in text and missing_key):
        return _unknown_key_message(missing_key or full_key or "?", object_type)
    value = _search(r"Value '([^']*)'", text)
    expected = _search(r"could not be converted to (\w+)", text)
    expected = expected or _search(r"is not a valid (\w+)", text)
    if full_key and expected:
        return f"{full_key}={value}: expected a value of type {expected.lower()}"
    if full_key and "Invalid value" in text:
        return f"{full_key}: {chain[-1]}".splitlines()[0]
    first = str(chain[-1]).strip().splitlines()[0] if chain else str(exc)
    return f"invalid configuration: {first}"


def _field_schema(schema: type, name: str) -> object:
    """The dataclass type of field ``name`` of ``schema`` (Optional[...] unwrapped), if any."""
    import typing

    hints = typing.get_type_hints(schema)
    hint = hints.get(name)
    for arg in (hint, *typing.get_args(hint)):
        if is_dataclass(arg):
            return arg
    return None


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _unknown_key_message(full_key: str, object_type: str | None) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = _valid_keys(parent, object_type)
    message = f"unknown config key '{full_key}'"
    close = difflib.get_close_matches(leaf, valid, n=1)
    if close:
        message += f" (did you mean '{(parent + '.' if parent else '') + close[0]}'?)"
    if valid:
        message += f"; valid keys of '{parent or 'the config'}': " + ", ".join(valid)
    return message


def _valid_keys(parent: str, object_type: str | None) -> List[str]:
    """Field names of the schema at ``parent``; ``object_type`` is the class Hydra reported."""
    from alignctl.registry import ALGORITHMS

    for algorithm in ALGORITHMS.values():
        if algorithm.config_cls.__name__ == object_type:
            return [f.name for f in fields(algorithm.config_cls)]
    node: object = JobConfig
    if not parent:
        return [f.name for f in fields(JobConfig)] + ["recipe"]
    for part in parent.split("."):
        if not is_dataclass(node):
            return []
        node = _field_schema(node, part)
    return [f.name for f in fields(node)] if is_dataclass(node) else []
