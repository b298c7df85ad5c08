"""Command-line arguments of the model tools: positionals, ``--flags`` and Hydra-style overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from alignctl.errors import ConfigError

# key=value (optionally +key / ++key / ~key): a config override, not a positional argument.
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.\-]*=")


@dataclass
class Parsed:
    positional: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    flags: Dict[str, object] = field(default_factory=dict)  # --name -> value (True for switches)
    repeated: Dict[str, List[str]] = field(default_factory=dict)  # --name given several times


def parse_args(args: Sequence[str], command: str, *, options: Sequence[str] = (), switches: Sequence[str] = (),
               repeatable: Sequence[str] = ()) -> Parsed:
    """Split argv. ``options`` take a value (``--out DIR`` or ``--out=DIR``), ``switches`` none,
    ``repeatable`` options may be given several times. An unknown ``--flag`` is an error."""
    parsed = Parsed()
    it = iter(args)
    for arg in it:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            if name in switches and not eq:
                parsed.flags[name] = True
                continue
            if name not in options and name not in repeatable:
                known = ", ".join([*options, *repeatable, *switches]) or "none"
                raise ConfigError(f"unknown option {name} (options: {known}); see alignctl {command} --help")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{name} needs a value; see alignctl {command} --help")
            if name in repeatable:
                parsed.repeated.setdefault(name, []).append(value)
            else:
                parsed.flags[name] = value
        elif _OVERRIDE.match(arg):
            parsed.overrides.append(arg)
        else:
            parsed.positional.append(arg)
    return parsed


def override_key(override: str) -> str:
    """``+algo.beta=0.1`` -> ``algo.beta``."""
    return override.lstrip("+~").partition("=")[0]


def int_flag(parsed: Parsed, name: str) -> int | None:
    value = parsed.flags.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} {value}: expected an integer") from None
