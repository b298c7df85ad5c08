"""What each config knob means, read from the schema's own source comments.

The dataclasses in ``alignctl.config`` and ``alignctl.algo_configs`` document every field with the
comment block right above it (or a comment at the end of its line). That comment is the single
source of truth: ``alignctl list algo=dpo`` and ``alignctl explain train.lr`` print it, and a test
checks that every field has one. A subclass that redefines a field without a comment keeps its
parent's meaning.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from alignctl.config import JobConfig


@dataclass
class Knob:
    """One leaf of the config: ``algo.beta``, its type, its value in the composed config, its meaning."""

    key: str
    type: str
    default: Any
    meaning: str


@functools.lru_cache(maxsize=None)
def _own_comments(cls: type) -> Dict[str, str]:
    """Field name -> comment, for the fields ``cls`` itself defines (not inherited ones)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    inline: Dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and lines[token.start[0] - 1].strip() != token.string.strip():
            inline[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    comments: Dict[str, str] = {}
    for node in getattr(body, "body", []):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: List[str] = []
        number = node.lineno - 1  # 1-based line numbers: lines[number - 1] is the line above
        while number >= 1 and lines[number - 1].strip().startswith("#"):
            above.insert(0, lines[number - 1].strip().lstrip("#").strip())
            number -= 1
        trailing = [inline[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in inline]
        text = " ".join(part for part in above + trailing if part)
        if text:
            comments[node.target.id] = text
    return comments


def field_comments(cls: type) -> Dict[str, str]:
    """Field name -> meaning for every field of dataclass ``cls``, inherited ones included."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            out.update(_own_comments(klass))
    return {f.name: out.get(f.name, "") for f in fields(cls)}


def describe_type(hint: Any) -> str:
    """``Optional[List[str]]`` -> ``list[str] | null``; dataclasses by their field count."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        rest = [describe_type(a) for a in args if a is not type(None)]
        return " | ".join(rest) + (" | null" if type(None) in args else "")
    if origin in (list, List):
        return f"list[{describe_type(args[0])}]" if args else "list"
    if origin in (dict, Dict):
        return f"dict[{describe_type(args[0])}, {describe_type(args[1])}]" if args else "dict"
    if hint is Any:
        return "any"
    if is_dataclass(hint):
        return hint.__name__
    return getattr(hint, "__name__", str(hint))


def _nested_schema(hint: Any) -> Optional[type]:
    for arg in (hint, *typing.get_args(hint)):
        if is_dataclass(arg):
            return arg
    return None


def iter_knobs(schema: type, node: Any, prefix: str) -> Iterator[Knob]:
    """Every leaf of ``schema`` (nested groups flattened to dotted keys), valued from ``node``
    (the composed config section, or None for the schema's own defaults)."""
    hints = typing.get_type_hints(schema)
    meanings = field_comments(schema)
    for f in fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = _value(node, f)
        nested = _nested_schema(hints[f.name])
        if nested is not None and (node is None or value is not None):
            yield from iter_knobs(nested, value if node is not None else None, key)
            continue
        yield Knob(key=key, type=describe_type(hints[f.name]), default=value, meaning=meanings[f.name])


def _value(node: Any, f) -> Any:
    if node is not None:
        from omegaconf import OmegaConf

        raw = node._get_node(f.name)  # unresolved: show ${oc.env:...} as written
        if raw is None:
            return None
        if OmegaConf.is_config(raw):
            return raw if not raw._is_none() else None
        return raw._value()
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


def section_schema(job, section: str) -> type:
    """The dataclass that types ``job.<section>`` (the algorithm's own schema for ``algo``)."""
    if section == "algo":
        from alignctl.registry import get_algorithm

        return get_algorithm(job.algo.name).config_cls
    return _nested_schema(typing.get_type_hints(JobConfig)[section])


def section_knobs(job, section: str) -> List[Knob]:
    """The knobs of one top-level section of a composed job (``algo``, ``train``, ``model``, ...)."""
    from omegaconf import OmegaConf

    schema = section_schema(job, section)
    if schema is None:  # a top-level leaf such as ``resume``
        meaning = field_comments(JobConfig)[section]
        hint = typing.get_type_hints(JobConfig)[section]
        return [Knob(section, describe_type(hint), OmegaConf.select(job, section), meaning)]
    return list(iter_knobs(schema, job[section], section))


def all_schemas() -> List[Tuple[str, type]]:
    """(prefix, dataclass) of every section a run can hold; ``algo`` once per algorithm."""
    from alignctl.registry import ALGORITHMS

    out: List[Tuple[str, type]] = [("algo", a.config_cls) for a in ALGORITHMS.values()]
    hints = typing.get_type_hints(JobConfig)
    for f in fields(JobConfig):
        nested = _nested_schema(hints[f.name])
        if nested is not None:
            out.append((f.name, nested))
    return out


def leaf_matches(leaf: str) -> Dict[str, List[str]]:
    """Full keys whose last part is ``leaf`` -> the algorithms having it (for ``algo.*`` keys).

    ``lr`` -> {"train.lr": []}; ``beta`` -> {"algo.beta": ["dpo", "cpo", ...]}."""
    from alignctl.registry import ALGORITHMS

    owners = {a.config_cls: a.name for a in ALGORITHMS.values()}
    found: Dict[str, List[str]] = {}
    for prefix, schema in all_schemas():
        for knob in iter_knobs(schema, None, prefix):
            if knob.key.rpartition(".")[2] == leaf:
                names = found.setdefault(knob.key, [])
                if prefix == "algo":
                    names.append(owners[schema])
    top = {f.name for f in fields(JobConfig) if _nested_schema(typing.get_type_hints(JobConfig)[f.name]) is None}
    if leaf in top:
        found.setdefault(leaf, [])
    return found


def format_value(value: Any) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value, resolve=False))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)
