"""What the system knows about each dataset: language, task, labels, feature dims.

Shards store canonical class names; the builder maps the names found in public
releases (including Chinese ones) onto them through `aliases`. The demo sets
are synthetic (see `egmf.shards.demo`).

Built-in datasets are listed in SPECS. Any other dataset is described by a spec
(a TOML or JSON file, `read_spec_file`; docs/data.md), which the builder stores
in the split's manifest and a run stores in its config (`data.specs`), so a
trained model knows its datasets without the shards. `add_spec` makes such a
spec known to this process:

    add_spec(read_spec_file("my_set.toml"))
    get_spec("my_set").task      # "classification"
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, field

from egmf.errors import DataError

CLASSIFICATION = "classification"
REGRESSION = "regression"

EMOTIONS_7 = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset."""

    name: str
    lang: str
    task: str
    labels: tuple[str, ...] = ()
    """Canonical class names (classification only), in a fixed order."""
    label_range: tuple[float, float] | None = None
    """Inclusive score range (regression only)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Other spellings of a class name (lower-cased) -> canonical name."""
    label_words: dict[str, str] = field(default_factory=dict)
    """Class name -> the word the model answers with, where it differs from the language's default word."""
    audio_dim: int = 0
    """Audio feature dim every sample must have (0: whatever the first sample has)."""
    vision_dim: int = 0
    """Vision feature dim every sample must have (0: whatever the first sample has)."""

    def to_dict(self) -> dict:
        """The spec as a spec file holds it (and as `data.specs` and manifests carry it)."""
        data = asdict(self)
        data["labels"], data["label_range"] = list(self.labels), self.label_range and list(self.label_range)
        return {key: value for key, value in data.items() if value not in ((), [], {}, None, 0)}

    def canonical_label(self, raw: object, sample_id: str) -> str | float:
        """The label as stored in a shard, or a DataError naming the sample and the fix."""
        if self.task == REGRESSION:
            try:
                score = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(
                    f"sample {sample_id!r}: label {raw!r} is not a number; {self.name} is a "
                    f"regression set with scores in {list(self.label_range)}"
                ) from None
            lo, hi = self.label_range
            if not lo <= score <= hi:
                raise DataError(
                    f"sample {sample_id!r}: score {score} is outside {self.name}'s range [{lo}, {hi}]; "
                    "check that the input file is the right dataset"
                )
            return score
        name = str(raw).strip().lower()
        name = self.aliases.get(name, name)
        if name not in self.labels:
            raise DataError(
                f"sample {sample_id!r}: unknown label {raw!r} for {self.name}; valid labels: "
                f"{', '.join(self.labels)}. Map other names with --label-map FILE.json "
                '({"raw name": "valid label"})'
            )
        return name


SPECS: dict[str, DatasetSpec] = {
    "meld": DatasetSpec("meld", "en", CLASSIFICATION, EMOTIONS_7),
    "cherma": DatasetSpec(
        "cherma",
        "zh",
        CLASSIFICATION,
        EMOTIONS_7,
        aliases={
            "愤怒": "anger",
            "厌恶": "disgust",
            "恐惧": "fear",
            "高兴": "joy",
            "平静": "neutral",
            "悲伤": "sadness",
            "惊奇": "surprise",
            "happy": "joy",
            "sad": "sadness",
        },
    ),
    "mosei": DatasetSpec("mosei", "en", REGRESSION, label_range=(-3.0, 3.0)),
    "sims2": DatasetSpec("sims2", "zh", REGRESSION, label_range=(-1.0, 1.0)),
    "demo_cls_en": DatasetSpec("demo_cls_en", "en", CLASSIFICATION, ("neutral", "joy", "sadness", "anger")),
    "demo_cls_zh": DatasetSpec("demo_cls_zh", "zh", CLASSIFICATION, ("neutral", "joy", "sadness", "anger")),
    "demo_reg_en": DatasetSpec("demo_reg_en", "en", REGRESSION, label_range=(-3.0, 3.0)),
    "demo_reg_zh": DatasetSpec("demo_reg_zh", "zh", REGRESSION, label_range=(-1.0, 1.0)),
    "demo_key_en": DatasetSpec("demo_key_en", "en", REGRESSION, label_range=(-3.0, 3.0)),
}

DEMO_DATASETS = ("demo_cls_en", "demo_cls_zh", "demo_reg_en", "demo_reg_zh")
"""The demo mix: what the demo recipe and `make train` train, and the default of data.train and data.eval."""
ALL_DEMO_DATASETS = (*DEMO_DATASETS, "demo_key_en")
"""Every synthetic demo set; demo_key_en (a look-up between distant frames, built for the global expert) is not in
the mix: in it the model does not learn it (docs/benchmarks.md)."""
SPLITS = ("train", "valid", "test")


LANGUAGES = ("en", "zh")
TASKS = (CLASSIFICATION, REGRESSION)
SPEC_KEYS = ("name", "lang", "task", "labels", "label_range", "aliases", "label_words", "audio_dim", "vision_dim")
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""Dataset names become folder, shard and MLflow key names: lower-case letters, digits and underscores."""

_added: dict[str, DatasetSpec] = {}


def spec_from_dict(data: dict, where: str) -> DatasetSpec:
    """A checked spec from a table (a spec file, a manifest, `data.specs`), or a DataError that names `where` and
    every problem at once."""
    problems = [f"unknown key {key!r} (keys: {', '.join(SPEC_KEYS)})" for key in data if key not in SPEC_KEYS]
    name, lang, task = (data.get(key) for key in ("name", "lang", "task"))
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems.append(f"name {name!r} must be lower-case letters, digits and '_' (starting with a letter)")
    if lang not in LANGUAGES:
        problems.append(f"lang {lang!r} must be one of {', '.join(LANGUAGES)} (the prompt's language)")
    if task not in TASKS:
        problems.append(f"task {task!r} must be one of {', '.join(TASKS)}")
    labels, label_range = data.get("labels") or [], data.get("label_range")
    if task == CLASSIFICATION:
        if len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels):
            problems.append(f"labels must list at least two class names, got {labels!r}")
        elif len(set(labels)) != len(labels) or any(x != x.strip().lower() for x in labels):
            problems.append(f"labels must be distinct, lower-case and without surrounding spaces, got {labels!r}")
        if label_range is not None:
            problems.append("label_range is for regression; a classification set lists labels")
    if task == REGRESSION:
        numbers = isinstance(label_range, list | tuple) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in label_range
        )
        if not numbers or len(label_range) != 2 or not label_range[0] < label_range[1]:
            problems.append(f"label_range must be [low, high] with low < high, got {label_range!r}")
        if labels:
            problems.append("labels are for classification; a regression set gives label_range")
    for key in ("aliases", "label_words"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            problems.append(f"{key} must be a table of class name -> string, got {table!r}")
        elif stray := set(table.values() if key == "aliases" else table) - set(labels):
            problems.append(f"{key} name classes that are not in labels: {sorted(stray)}")
    for key in ("audio_dim", "vision_dim"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{key} must be an integer >= 1 (or 0: any), got {value!r}")
    if problems:
        raise DataError(f"{where}: invalid dataset spec: " + "; ".join(problems))
    return DatasetSpec(
        name,
        lang,
        task,
        tuple(labels),
        tuple(float(x) for x in label_range) if task == REGRESSION else None,
        {str(k).lower(): v for k, v in data.get("aliases", {}).items()},
        dict(data.get("label_words", {})),
        data.get("audio_dim", 0),
        data.get("vision_dim", 0),
    )


def read_spec_file(path: str) -> DatasetSpec:
    """A spec from a .toml or .json file (docs/data.md), or a DataError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    except FileNotFoundError:
        raise DataError(f"dataset spec {path} does not exist; pass the path of a .toml or .json spec") from None
    except IsADirectoryError:
        raise DataError(f"dataset spec {path} is a folder; pass the path of a .toml or .json spec file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.endswith(".toml") else "JSON (a .toml file is read as TOML)"
        raise DataError(f"dataset spec {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"dataset spec {path} must hold a table (name, lang, task, ...), got {type(data).__name__}")
    return spec_from_dict(data, path)


def add_spec(spec: DatasetSpec) -> None:
    """Make a dataset that is not built in known to this process; a second, different spec of the same name (or
    of a built-in name) is a DataError."""
    known = SPECS.get(spec.name) or _added.get(spec.name)
    if known is None:
        _added[spec.name] = spec
    else:
        check_same_dataset(known, spec, "already known")


def check_same_dataset(known: DatasetSpec, spec: DatasetSpec, how: str) -> None:
    """A DataError unless `spec` describes `known`'s dataset as a trained model sees it."""
    if prompt_facts(known) != prompt_facts(spec):
        raise DataError(
            f"dataset {spec.name!r} is {how} with another spec ({known.to_dict()}), not {spec.to_dict()}; "
            "give the new dataset another name"
        )


def prompt_facts(spec: DatasetSpec) -> tuple:
    """What a trained model depends on: two specs that agree on these describe the same dataset for it."""
    return spec.lang, spec.task, spec.labels, spec.label_range, spec.label_words


def is_known(name: str) -> bool:
    return name in SPECS or name in _added


def get_spec(name: str) -> DatasetSpec:
    """The spec for `name`, or a DataError listing the known datasets."""
    spec = SPECS.get(name) or _added.get(name)
    if spec is None:
        known = ", ".join([*SPECS, *_added])
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {known}. A dataset of your own needs a spec: build its "
            "shards with `egmf-shards build --format jsonl --spec FILE` (docs/data.md)"
        )
    return spec
