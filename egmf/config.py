"""The configuration machinery: TOML recipes with includes, `--section.key=value` overrides, typed dataclass trees.

    table = read_recipe("launch/recipes/mosei.toml")          # includes merged, the recipe's own values win
    cfg = build_tree(Config, table, ["--data.batch_size=4"])    # ConfigError naming every problem at once

Each component owns its section (a dataclass with a docstring under every
field and a `problems()` method); the root tree that gathers them is
`egmf.train.config.Config`. This module knows no section.

A recipe may `include = ["other.toml", ...]` (paths relative to it), merged
first, so dataset recipes share a backbone recipe. Overrides are
`--section.key=value` (or `--section.key.subkey=value` inside a table); values
are read as TOML (`4`, `2e-4`, `true`, `["q_proj"]`, `{mosei = 1.0}`), anything
else as a string. Unknown sections or keys, wrong types and invalid values are
all collected and raised at once in a ConfigError naming each key, before any
process group starts.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import textwrap
import tomllib
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from egmf.errors import ConfigError


def read_recipe(path: str, table_valued: set[str] = frozenset(), seen: tuple[str, ...] = ()) -> dict:
    """A recipe's table with its includes merged in (the recipe's own values win).

    `table_valued`: dotted names of fields whose value is itself a table (see `table_valued_fields`); an include
    and the recipe each give such a table whole, and the recipe's replaces the include's.
    """
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"recipe include loop: {' -> '.join(seen + (path,))}")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    includes = table.pop("include", [])
    merged: dict = {}
    for include in [includes] if isinstance(includes, str) else includes:
        included = read_recipe(os.path.join(os.path.dirname(path), include), table_valued, seen + (path,))
        deep_merge(merged, included, table_valued)
    return deep_merge(merged, table, table_valued)


def deep_merge(base: dict, update: dict, table_valued: set[str] = frozenset(), prefix: str = "") -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and prefix + key not in table_valued:
            deep_merge(base[key], value, table_valued, f"{prefix}{key}.")
        else:
            base[key] = value
    return base


def table_valued_fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the fields of a dataclass tree whose type is a dict (`data.train`, `eval.select`, ...)."""
    found = set()
    for name, hint in typing.get_type_hints(cls).items():
        if is_dataclass(hint):
            found |= table_valued_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) is dict:
            found.add(prefix + name)
    return found


def parse_override(text: str) -> tuple[list[str], Any]:
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form --section.key=value")
    key, value = text[2:].split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.split("."), parsed


def apply_override(table: dict, path: list[str], value: Any) -> None:
    if len(path) < 2:
        raise ConfigError(f"override --{'.'.join(path)} names no key; use --section.key=value")
    node = table
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def build_tree(cls: type, table: dict, overrides: list[str] = ()):
    """A checked instance of the root dataclass `cls` from a parsed recipe (or a saved config.json) plus
    overrides. The root's `problems()` checks the values; every problem is raised at once."""
    for text in overrides:
        apply_override(table, *parse_override(text))
    problems: list[str] = []
    tree = build(cls, table, "", problems)
    problems += tree.problems()  # fields with unknown keys or wrong types kept their defaults: still checkable
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return tree


def build(cls: type, table: dict, prefix: str, problems: list[str]):
    """An instance of dataclass `cls` from `table`, appending a line per problem to `problems`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in table:
        if key not in names:
            problems.append(
                f"unknown key {prefix}{key} (known in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(sorted(names))})"
            )
    values = {}
    for name in names & set(table):
        hint, value = hints[name], table[name]
        if is_dataclass(hint):
            if isinstance(value, dict):
                values[name] = build(hint, value, f"{prefix}{name}.", problems)
            else:
                problems.append(f"{prefix}{name} must be a table ([{prefix}{name}])")
        else:
            try:
                values[name] = checked(value, hint)
            except TypeError as exc:
                problems.append(f"{prefix}{name}: {exc}")
    return cls(**values)


def checked(value: Any, hint: Any) -> Any:
    """`value` if it fits type `hint` (ints widen to float), else TypeError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        return [checked(v, args[0]) for v in value]
    if origin is dict and isinstance(value, dict):
        return {checked(k, args[0]): checked(v, args[1]) for k, v in value.items()}
    if origin is None and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise TypeError(f"expected {getattr(hint, '__name__', None) or hint}, got {value!r}")


def range_problems(
    section: str,
    values: object,
    keys: typing.Iterable[str],
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> list[str]:
    """One line per key of `values` outside the range, all in one format: `section.key must be >= 1, got 0`,
    `section.key must be > 0, got 0.0`, `section.key must be in [0, 1), got 1.5`."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"{'<' if high_open else '<='} {high:g}"
    found = []
    for key in keys:
        value = getattr(values, key)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            found.append(f"{section}.{key} must be {wanted}, got {value!r}")
    return found


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings live only in the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and is_doc:
            docs[statement.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe_tree(cls: type) -> str:
    """Every section and key of a config tree with its default and doc, for `--help`."""
    lines = []
    section_docs = field_docs(cls)
    for section in fields(cls):
        section_cls = typing.get_type_hints(cls)[section.name]
        lines.append(f"[{section.name}]  {section_docs.get(section.name, '')}")
        docs = field_docs(section_cls)
        for item in fields(section_cls):
            default = item.default_factory() if item.default_factory is not MISSING else item.default
            lines.append(f"  --{section.name}.{item.name}={toml_value(default)}")
            lines.append(f"      {docs.get(item.name, '')}")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """`value` written as TOML, the way an override takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = [k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k) for k in value]
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in zip(keys, value.values(), strict=True)) + "}"
    return repr(value)
