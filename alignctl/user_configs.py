"""Configs from outside the shipped folders: a recipe given as a file path, a user's own config
folder (``--config-dir``) and a finished run's saved config (``--from RUN_DIR``).

``alignctl train`` keeps these options in its override list as ``--config-dir=/abs/dir`` and
``--from=/abs/run`` (paths made absolute, as are recipe paths), so that a launch, which re-executes
``alignctl train OVERRIDES`` in other processes or prints the command for other machines, composes
the very same config. ``compose_job`` takes them apart with ``parse_sources``.

A config folder mirrors the shipped layout: ``DIR/<group>/NAME.yaml`` is a preset (``model=NAME``),
found through Hydra's search path; every other YAML file is a recipe named by its path relative to
``DIR`` without the suffix (``DIR/my_exp.yaml`` -> ``recipe=my_exp``, ``DIR/exps/a.yaml`` ->
``recipe=exps/a``). A name that a shipped preset or recipe already has is refused, never shadowed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from alignctl.errors import ConfigError

FROM = "--from"
CONFIG_DIR = "--config-dir"
OPTIONS = (FROM, CONFIG_DIR)
YAML_SUFFIXES = (".yaml", ".yml")
RUN_CONFIG = "config.yaml"  # alignctl.run_dir.CONFIG_FILE (not imported: it pulls in the checkpoint code)
# ConfigStore names of the configs made here (a leading underscore keeps them apart from shipped ones).
PATH_RECIPES = "_file"
FROM_RUN_RECIPE = "_from_run"


def option_token(option: str, value: str) -> str:
    """``--from=/abs/path``: the form kept in the override list (the path made absolute)."""
    return f"{option}={_absolute(value)}"


def absolute_recipe(override: str) -> str:
    """``recipe=./exp.yaml`` -> ``recipe=/abs/exp.yaml`` (other overrides unchanged)."""
    key, sep, value = override.partition("=")
    if sep and key.lstrip("+") == "recipe" and is_recipe_path(value):
        return f"{key}={_absolute(value)}"
    return override


def take_option(arg: str, rest) -> Optional[str]:
    """``--from X`` / ``--from=X`` / ``--config-dir X`` as the token kept among the overrides (the
    value taken from ``rest``, an iterator over the next arguments, when not given with ``=``);
    None for any other argument."""
    option, sep, value = arg.partition("=")
    if option not in OPTIONS:
        return None
    if not sep:
        value = next(rest, "")
    if not value or value.startswith("-"):
        what = "a run directory" if option == FROM else "a folder of configs"
        raise ConfigError(f"{option} needs {what}: {option} DIR")
    return option_token(option, value)


def repeat_note(overrides: Sequence[str]) -> Optional[str]:
    """The console line of a repeat (``--from``): where its config came from and where it goes."""
    run = next((item.partition("=")[2] for item in overrides if item.startswith(FROM + "=")), None)
    if run is None:
        return None
    target = next((item.partition("=")[2] for item in overrides if item.partition("=")[0] == "run.output_dir"), None)
    where = f"run.output_dir={target}" if target else "a new run directory (set run.output_dir=DIR to name it)"
    changed = sum(1 for item in overrides if item.partition("=")[0] not in OPTIONS)
    note = f"repeating {run} (its {RUN_CONFIG}, {changed} override(s)) into {where}"
    if target and Path(_absolute(target)) == Path(run):
        return note  # the run directory's own checks decide (overwrite, resume)
    return f"{note}; {run} is left as it is"

def is_recipe_path(value: str) -> bool:
    """A recipe named by its file (``./exp.yaml``, ``~/x.yml``, ``/abs/x.yaml``), not by its name."""
    return value.endswith(YAML_SUFFIXES) or value.startswith(("/", "./", "../", "~"))


def _absolute(value: str) -> str:
    return str(Path(value).expanduser().absolute())


@dataclass
class UserSources:
    """What the user's options add to a composition, and the Hydra overrides that remain."""

    overrides: List[str]
    config_dirs: List[Path] = field(default_factory=list)
    from_run: Optional[Path] = None
    # group -> preset names found in the config folders; recipe name -> file
    presets: Dict[str, List[str]] = field(default_factory=dict)
    recipes: Dict[str, Path] = field(default_factory=dict)

    def claims(self, override: str) -> bool:
        """Overrides naming a user preset or recipe (the shipped-name check must not see them)."""
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            return False
        if key == "recipe":
            return is_recipe_path(value) or value in self.recipes
        return value in self.presets.get(key, ())

    def hydra_overrides(self, groups: Sequence[str]) -> List[str]:
        """The overrides Hydra composes (recipe paths -> their ConfigStore names, search path, ``--from``)."""
        result = []
        for override in self.overrides:
            key, sep, value = override.partition("=")
            if sep and key.lstrip("+") == "recipe" and is_recipe_path(value):
                override = f"{key}={PATH_RECIPES}/{_store_name(Path(_absolute(value)))}"
            result.append(override)
        if self.config_dirs:
            # Hydra takes the text after file:// as the path itself (no URI escapes).
            entries = ",".join(_hydra_quote(f"file://{d}") for d in self.config_dirs)
            result.append(f"hydra.searchpath=[{entries}]")
        if self.from_run is not None:
            chosen = self.chosen_groups()
            # The saved config sets every group in full: no preset beneath it (a preset's map
            # entries would survive the merge), except the algorithm's, which gives its schema.
            result += [f"~{group}" for group in groups if group != "algo" and group not in chosen]
            result.append(f"recipe={FROM_RUN_RECIPE}")
        return result

    def chosen_groups(self) -> List[str]:
        """Groups (and ``recipe``) picked on the command line: ``dataset=x``, not ``dataset.path=x``."""
        chosen = []
        for override in self.overrides:
            key, sep, _ = override.partition("=")
            if sep and not key.startswith("~") and "." not in key:
                chosen.append(key.lstrip("+"))
        return chosen

    def register(self, groups: Sequence[str]) -> None:
        """Put the user's recipes (and the saved run config) into Hydra's ConfigStore."""
        from hydra.core.config_store import ConfigStore

        store = ConfigStore.instance()
        for override in self.overrides:
            key, sep, value = override.partition("=")
            if sep and key.lstrip("+") == "recipe" and is_recipe_path(value):
                path = Path(_absolute(value))
                store.store(group=f"recipe/{PATH_RECIPES}", name=_store_name(path),
                            node=load_recipe(path, f"recipe={value}"), package="_global_")
        for name, path in self.recipes.items():
            sub, _, leaf = name.rpartition("/")
            store.store(group="recipe/" + sub if sub else "recipe", name=leaf,
                        node=load_recipe(path, f"{CONFIG_DIR} recipe {name} ({path})"), package="_global_")
        if self.from_run is not None:
            node = saved_run_config(self.from_run, set(self.chosen_groups()) & set(groups))
            store.store(group="recipe", name=FROM_RUN_RECIPE, node=node, package="_global_")


def parse_sources(overrides: Sequence[str], groups: Sequence[str], shipped_presets, shipped_recipes: Sequence[str]) -> UserSources:
    """Split ``--from=``/``--config-dir=`` tokens off ``overrides`` and check what they name.

    ``shipped_presets(group)`` lists a group's shipped presets (for the name-clash check)."""
    rest: List[str] = []
    config_dirs: List[Path] = []
    from_run: Optional[Path] = None
    for item in overrides:
        option, sep, value = item.partition("=")
        if option not in OPTIONS:
            rest.append(item)
            continue
        if not sep or not value:
            raise ConfigError(f"{option} needs a folder: {option} DIR (or {option}=DIR)")
        path = Path(_absolute(value))
        if option == CONFIG_DIR:
            if not path.is_dir():
                raise ConfigError(f"{CONFIG_DIR} {value}: no such directory")
            config_dirs.append(path)
        elif from_run is not None:
            raise ConfigError(f"{FROM} given twice ({from_run} and {value}); repeat one run at a time")
        else:
            from_run = check_run_dir(path, value)
    for item in rest:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") == "recipe" and is_recipe_path(value):
            check_recipe_file(value)
        if key.startswith("hydra.searchpath") and config_dirs:
            raise ConfigError(f"{item}: give extra config folders with {CONFIG_DIR} DIR only (it sets Hydra's search path)")
    sources = UserSources(rest, config_dirs, from_run)
    if from_run is not None and any(k == "recipe" for k in sources.chosen_groups()):
        raise ConfigError(
            f"{FROM} {from_run} and recipe= both give a whole experiment; use one (with {FROM}, change single "
            "values as overrides, e.g. train.lr=1e-4)"
        )
    for folder in config_dirs:
        _scan_config_dir(folder, sources, groups, shipped_presets, shipped_recipes)
    if config_dirs:
        _check_own_choices(sources, groups, shipped_presets)
    return sources


def _check_own_choices(sources: UserSources, groups, shipped_presets) -> None:
    """``model=nope`` with config folders: name the folders' presets beside the shipped ones."""
    for item in sources.overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep and key in groups and not sources.claims(item) and value not in shipped_presets(key):
            own = sources.presets.get(key, [])
            raise ConfigError(
                f"{key}={value}: no such preset in group '{key}'; choose one of: {', '.join(shipped_presets(key))} "
                f"(shipped), {', '.join(own) or 'none'} (in {CONFIG_DIR} {', '.join(map(str, sources.config_dirs))})"
            )


def _scan_config_dir(folder: Path, sources: UserSources, groups, shipped_presets, shipped_recipes) -> None:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix not in YAML_SUFFIXES or not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        name = rel.with_suffix("").as_posix()
        group, _, preset = name.partition("/")
        if group in groups and preset:
            if preset in shipped_presets(group):
                raise ConfigError(
                    f"{CONFIG_DIR} {folder}: {rel} has the name of a shipped preset ({group}={preset}); rename "
                    "the file (a shipped preset is never replaced)"
                )
            if path.suffix != ".yaml":
                raise ConfigError(f"{CONFIG_DIR} {folder}: {rel}: a preset file must end in .yaml (Hydra reads no other)")
            sources.presets.setdefault(group, []).append(preset)
            continue
        if name in shipped_recipes:
            raise ConfigError(
                f"{CONFIG_DIR} {folder}: {rel} has the name of a shipped recipe (recipe={name}); rename the file"
            )
        if name in sources.recipes:
            raise ConfigError(
                f"{CONFIG_DIR}: two recipes named {name} ({sources.recipes[name]} and {path}); rename one"
            )
        sources.recipes[name] = path


def check_recipe_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"recipe={value}: no such file")
    if not path.is_file():
        raise ConfigError(f"recipe={value}: not a file; give a recipe's YAML file (or a recipe name, see `alignctl list`)")
    if path.suffix not in YAML_SUFFIXES:
        raise ConfigError(f"recipe={value}: a recipe file must be YAML (.yaml or .yml)")
    return path


def load_recipe(path: Path, what: str) -> DictConfig:
    """A recipe file as a ConfigStore node. A recipe that sets ``algo.name`` without picking the
    algo preset gets that preset (so its algo fields are typed by that algorithm's schema)."""
    node = _load_yaml(path, what)
    defaults = list(node.get("defaults") or [])
    picks_algo = any(_default_group(entry) in ("algo", "schema/algo") for entry in defaults)
    name = OmegaConf.select(node, "algo.name", default=None)
    if isinstance(name, str) and not picks_algo:
        node.defaults = [*defaults, {"override /algo": name}]
    return node


def _default_group(entry) -> Optional[str]:
    """The group a defaults-list entry picks: ``{override /algo: dpo}`` -> ``algo``."""
    if not isinstance(entry, (dict, DictConfig)) or len(entry) != 1:
        return None
    key = str(next(iter(entry.keys())))
    return key.removeprefix("override").strip().lstrip("/").partition("@")[0]


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError, OSError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what}: cannot read it as YAML ({first})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{what}: holds a list or a single value; a config file is a mapping of keys to values")
    return node


def check_run_dir(path: Path, given: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{FROM} {given}: no such directory")
    if not (path / RUN_CONFIG).is_file():
        raise ConfigError(
            f"{FROM} {given}: holds no {RUN_CONFIG}, so it is not an alignctl run directory; point {FROM} at a "
            "folder a run wrote (runs/<algo>-<time>/ or its run.output_dir)"
        )
    return path


def saved_run_config(run_dir: Path, replaced_groups) -> DictConfig:
    """``RUN_DIR/config.yaml`` as a recipe: every value of the old run (``${oc.env:...}`` kept as
    written), less the groups the command line picks anew, and with the run's own place cleared
    (``run.output_dir``, ``run.overwrite``, ``resume``) so the repeat is a new run directory."""
    what = f"{FROM} {run_dir} ({RUN_CONFIG})"
    node = _load_yaml(run_dir / RUN_CONFIG, what)
    name = OmegaConf.select(node, "algo.name", default=None)
    if not isinstance(name, str):
        raise ConfigError(f"{what}: has no algo.name; it is not a config an alignctl run saved")
    for group in replaced_groups:
        node.pop(group, None)
    if "algo" not in replaced_groups:
        node.defaults = [{"override /algo": name}]
    if isinstance(node.get("run"), DictConfig):
        node.run.output_dir = None
        node.run.overwrite = False
    node.resume = None
    return node


def _store_name(path: Path) -> str:
    """A ConfigStore option name for a recipe file: its stem and a hash of its absolute path."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    return f"{stem}_{digest}"


def _hydra_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

