"""The configuration: a tree of dataclasses, one section per component, from TOML recipes plus overrides.

    cfg = load_config("launch/recipes/mosei.toml", ["--llm.path=/models/Qwen2.5-7B-Instruct", "--data.batch_size=4"])

A recipe may `include = ["other.toml", ...]` (paths relative to it), merged
first, so dataset recipes share a backbone recipe. Overrides are
`--section.key=value` (or `--section.key.subkey=value` inside a table); values
are read as TOML (`4`, `2e-4`, `true`, `["q_proj"]`, `{mosei = 1.0}`), anything
else as a string. Unknown sections or keys, wrong types and invalid values are
all collected and raised at once in a ConfigError naming each key, before any
process group starts.
"""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from egmf.data.config import DataConfig
from egmf.model.config import FusionConfig, LLMConfig, LoraConfig
from egmf.model.prompt import PromptConfig
from egmf.train.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    EvalConfig,
    MLflowConfig,
    OptimConfig,
    TrainConfig,
)


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem, each naming its key."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, mixing, batching, workers."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The fusion module's architecture."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt templates, label words, the text-only ablation."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The causal LLM backbone."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the LLM."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, learning-rate schedule, accumulation, clipping."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length of the run, output folder, logging, device."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic and final evaluation, best-checkpoint choice, early stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    """Experiment tracking."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed engine's JSON config."""

    def problems(self) -> list[str]:
        datasets = sorted(set(self.data.train) | set(self.data.eval))
        return (
            self.data.problems()
            + self.fusion.problems()
            + self.prompt.problems([d for d in datasets if _known_dataset(d)])
            + self.optim.problems()
            + self.train.problems()
            + self.eval.problems([d for d in self.data.eval if _known_dataset(d)])
            + self.checkpoint.problems()
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _known_dataset(name: str) -> bool:
    from egmf.datasets import SPECS

    return name in SPECS


def read_recipe(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe's table with its includes merged in (the recipe's own values win)."""
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
        deep_merge(merged, read_recipe(os.path.join(os.path.dirname(path), include), seen + (path,)))
    return deep_merge(merged, table)


def deep_merge(base: dict, update: dict, prefix: str = "") -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and prefix + key not in _TABLE_VALUED:
            deep_merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value
    return base


# Fields whose value is itself a table: a recipe replaces them whole rather than merging key by key.
_TABLE_VALUED = {"data.train", "eval.select"}


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


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    return config_from_table(read_recipe(recipe) if recipe else {}, overrides)


def config_from_table(table: dict, overrides: list[str] = ()) -> Config:
    """A checked Config from a parsed recipe (or a saved config.json) plus overrides."""
    for text in overrides:
        apply_override(table, *parse_override(text))
    problems: list[str] = []
    cfg = build(Config, table, "", problems)
    problems += cfg.problems()  # fields with unknown keys or wrong types kept their defaults: still checkable
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


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
