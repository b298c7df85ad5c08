"""`alignctl list`, `alignctl explain` and `alignctl version`: what can be set, and what it means.

    alignctl list                       algorithms, presets of every group, recipes
    alignctl list algo=dpo [train ...]  every knob of the named sections: type, value, meaning
    alignctl explain algo.beta [algo=cpo]   one knob (for every algorithm that has it, unless algo= is given)

Values are those of the composed config (the preset's, after any other override given), so
``list algo=simpo`` shows SimPO's beta=2.0, not the CPO schema's 0.1. Meanings are the schema's
source comments (``alignctl.schema_docs``).
"""

from __future__ import annotations

import difflib
from typing import List, Optional, Sequence, Tuple

from alignctl.errors import ConfigError

INDENT = "      "


def list_command(args: List[str]) -> int:
    from rich.console import Console

    console = Console(highlight=False)  # stdout: this listing is the command's output
    if not args:
        _print_catalogue(console)
        return 0
    sections, overrides = _sections_and_overrides(args)
    if not sections:
        raise ConfigError(
            f"list {' '.join(args)}: name what to list, e.g. `alignctl list algo=dpo` (a group and its "
            "preset) or `alignctl list train` (a section)"
        )
    from alignctl.compose import compose_job

    job = compose_job(overrides)
    for section in sections:
        _print_section(console, job, section, overrides)
    return 0


def explain_command(args: List[str]) -> int:
    from rich.console import Console

    from alignctl.compose import compose_job, list_presets

    if not args or "=" in args[0]:
        raise ConfigError("usage: alignctl explain KEY [OVERRIDE ...], e.g. `alignctl explain train.lr` or "
                          "`alignctl explain algo.beta algo=cpo`")
    key, overrides = args[0], list(args[1:])
    console = Console(highlight=False)
    section = key.split(".", 1)[0]
    if "." not in key and not _is_section(section):
        raise ConfigError(_bare_key_hint(key) or f"unknown config key '{key}'; see `alignctl list`")
    if section == "algo" and not any(o.split("=", 1)[0] == "algo" for o in overrides):
        # Without algo=: the knob in every algorithm preset that has it.
        found = []
        for preset in list_presets("algo"):
            job = compose_job([f"algo={preset}", *overrides])
            knobs = [k for k in _knobs(job, "algo") if k.key == key or k.key.startswith(key + ".")]
            if knobs:
                found.append((preset, knobs))
        if not found:
            raise ConfigError(_unknown_in_section(key, _all_algo_keys()))
        console.print(f"[bold]{key}[/]")
        for preset, knobs in found:
            for knob in knobs:
                _print_knob(console, knob, label=f"algo={preset}")
        return 0
    job = compose_job(overrides)
    knobs = _knobs(job, section)
    chosen = [k for k in knobs if k.key == key or k.key.startswith(key + ".")]
    if not chosen:
        raise ConfigError(_unknown_in_section(key, [k.key for k in knobs]))
    for knob in chosen:
        _print_knob(console, knob)
    return 0


def version_command(args: List[str]) -> int:
    print(f"alignctl {version()}")
    return 0


def version() -> str:
    """The installed package's version, or the source checkout's pyproject.toml version."""
    from importlib import metadata

    try:
        return metadata.version("alignctl")
    except metadata.PackageNotFoundError:
        import tomllib

        from alignctl.compose import project_root

        with open(project_root() / "pyproject.toml", "rb") as file:
            return tomllib.load(file)["project"]["version"]


# --------------------------------------------------------------------------- the catalogue


def _print_catalogue(console) -> None:
    from rich.table import Table

    from alignctl.compose import GROUPS, list_presets, list_recipes
    from alignctl.registry import ALGORITHMS

    algos = Table(title="algorithms (algo=NAME; `alignctl list algo=NAME` shows its knobs)", title_justify="left")
    algos.add_column("name", style="bold")
    algos.add_column("what it trains")
    for algorithm in ALGORITHMS.values():
        algos.add_row(algorithm.name, algorithm.description)
    for name, schema_name, description in preset_algorithms():
        algos.add_row(name, f"(preset of {schema_name}) {description}")
    console.print(algos)
    presets = Table(title="presets (GROUP=PRESET)", title_justify="left")
    presets.add_column("group", style="bold")
    presets.add_column("presets")
    for group in GROUPS:
        presets.add_row(group, ", ".join(list_presets(group)))
    presets.add_row("recipe", ", ".join(list_recipes()))
    console.print(presets)


def preset_algorithms() -> List[Tuple[str, str, str]]:
    """(preset, algorithm it configures, its description) for algo presets that are not an
    algorithm's own name, such as simpo (a CPO preset); the description is the preset's header."""
    from omegaconf import OmegaConf

    from alignctl.compose import configs_dir, list_presets
    from alignctl.registry import ALGORITHMS

    out = []
    for preset in list_presets("algo"):
        if preset in ALGORITHMS:
            continue
        path = configs_dir() / "algo" / f"{preset}.yaml"
        node = OmegaConf.load(path)
        name = node.get("name") or node.get("algo", {}).get("name")
        out.append((preset, str(name), preset_description("algo", preset)))
    return out


def preset_description(group: str, preset: str) -> str:
    """The comment lines at the top of a preset file, joined (``# @package`` lines left out)."""
    from alignctl.compose import configs_dir

    lines = []
    for line in (configs_dir() / group / f"{preset}.yaml").read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        if not text.startswith("# @package"):
            lines.append(text.lstrip("#").strip())
    return " ".join(lines)


# --------------------------------------------------------------------------- one section


def _sections_and_overrides(args: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``algo=dpo train`` -> sections ["algo", "train"], overrides ["algo=dpo"]."""
    from alignctl.compose import GROUPS

    sections: List[str] = []
    overrides: List[str] = []
    for arg in args:
        key, sep, _ = arg.partition("=")
        if sep:
            overrides.append(arg)
            if key in GROUPS and key not in sections:
                sections.append(key)
        elif _is_section(arg):
            if arg not in sections:
                sections.append(arg)
        else:
            sections_text = ", ".join(_section_names())
            raise ConfigError(_bare_key_hint(arg) or f"list {arg}: not a section; sections: {sections_text}")
    return sections, overrides


def _section_names() -> List[str]:
    from dataclasses import fields

    from alignctl.config import JobConfig

    return [f.name for f in fields(JobConfig)]


def _is_section(name: str) -> bool:
    return name in _section_names()


def _knobs(job, section: str):
    from alignctl.schema_docs import section_knobs

    return section_knobs(job, section)


def _print_section(console, job, section: str, overrides: Sequence[str]) -> None:
    from rich.markup import escape

    from alignctl.compose import GROUPS
    from alignctl.config import JobConfig
    from alignctl.schema_docs import field_comments, section_schema

    title = section
    about = field_comments(JobConfig).get(section, "")
    if section in GROUPS:
        preset = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == section), None)
        if preset is None:
            preset = _default_preset(section)
        title = f"{section}={preset}"
        about = preset_description(section, preset) or about
    schema = section_schema(job, section)
    if schema is not None and section == "algo":
        title += f" ({schema.__name__})"
    console.print(f"[bold]{escape(title)}[/]", soft_wrap=True)
    if about:
        console.print(_wrap(console, about, "  "), soft_wrap=True)
    for knob in _knobs(job, section):
        _print_knob(console, knob)
    console.print()


def _default_preset(group: str) -> str:
    """The preset train.yaml's defaults list picks for ``group``."""
    from omegaconf import OmegaConf

    from alignctl.compose import configs_dir

    for item in OmegaConf.load(configs_dir() / "train.yaml").defaults:
        if isinstance(item, dict) or OmegaConf.is_dict(item):
            for key, value in item.items():
                if key == group:
                    return str(value)
    return "?"


def _print_knob(console, knob, label: Optional[str] = None) -> None:
    from rich.markup import escape

    from alignctl.schema_docs import format_value

    head = f"  [bold cyan]{escape(label or knob.key)}[/]: {escape(knob.type)} = {escape(format_value(knob.default))}"
    console.print(head, soft_wrap=True)
    console.print(_wrap(console, knob.meaning, INDENT), soft_wrap=True)


def _wrap(console, text: str, indent: str) -> str:
    """``text`` wrapped to the console's width, every line indented (escaped for rich)."""
    import textwrap

    from rich.markup import escape

    width = max(40, console.width)
    wrapped = textwrap.fill(
        text, width=width, initial_indent=indent, subsequent_indent=indent,
        break_on_hyphens=False, break_long_words=False,
    )
    return escape(wrapped)


# --------------------------------------------------------------------------- unknown keys


def _all_algo_keys() -> List[str]:
    from alignctl.registry import ALGORITHMS
    from alignctl.schema_docs import iter_knobs

    keys = {k.key for a in ALGORITHMS.values() for k in iter_knobs(a.config_cls, None, "algo")}
    return sorted(keys)


def _unknown_in_section(key: str, valid: Sequence[str]) -> str:
    message = f"unknown config key '{key}'"
    close = difflib.get_close_matches(key, list(valid), n=3)
    if close:
        message += " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
    section = key.split(".", 1)[0]
    return message + f"; `alignctl list {section}` shows them all"


def _bare_key_hint(key: str) -> Optional[str]:
    """``lr`` -> 'no top-level key ... did you mean train.lr'; None when no schema field is called so."""
    from alignctl.compose import bare_key_message

    return bare_key_message(key, None)
