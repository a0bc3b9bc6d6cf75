"""The per-split manifest: `ROOT/DATASET/SPLIT/manifest.json`.

It is written last, after every shard of the split is complete, so a split
without a manifest is an unfinished build. Loaders size epochs and validate
samples from it; `inspect` prints it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from egmf.datasets import CLASSIFICATION, DatasetSpec, spec_from_dict
from egmf.errors import DataError

MANIFEST_NAME = "manifest.json"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tar")
FORMAT_NAME = "egmf-shards"
FORMAT_VERSION = 1


class MissingManifest(DataError):
    """The split has no readable manifest: it was never built (or its root is wrong)."""


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class SplitManifest:
    dataset: str
    split: str
    lang: str
    task: str
    num_samples: int
    audio_dim: int
    vision_dim: int
    shards: list[ShardInfo]
    labels: list[str] = field(default_factory=list)
    """Class names (classification); empty for regression."""
    label_range: list[float] | None = None
    """[lo, hi] of the dataset's scores (regression)."""
    label_words: dict[str, str] = field(default_factory=dict)
    """Class name -> answer word, where the dataset's spec sets one."""
    labeled: bool = True
    """False for a split built without labels: evaluation and prediction take it, training refuses it."""
    label_stats: dict = field(default_factory=dict)
    """Histogram {class: count} for classification; min/max/mean/std for regression."""
    length_stats: dict = field(default_factory=dict)
    """Per modality: min, p50, p90, p99, max, mean of frame counts."""
    text_stats: dict = field(default_factory=dict)
    """Utterance lengths in words and characters (p50, p90, p99, max); set when texts.jsonl is beside the shards
    (egmf.shards.texts)."""
    feature_stats: dict = field(default_factory=dict)
    """Per modality: per-dimension mean and std of the split's finite feature values (egmf.shards.stats); the
    model standardises its inputs with its train split's. Empty in shards built before it existed."""
    build_report: dict = field(default_factory=dict)
    """What the builder fixed: non-finite values zeroed, values clipped, etc."""
    source: dict = field(default_factory=dict)
    location: str = ""
    """Where this manifest was read from (a directory or URL prefix); not stored."""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def spec(self) -> DatasetSpec:
        """The dataset's spec as the builder stored it (how a dataset that is not built in becomes known)."""
        facts = {"name": self.dataset, "lang": self.lang, "task": self.task, "label_words": self.label_words}
        facts.update({"labels": self.labels} if self.task == CLASSIFICATION else {"label_range": self.label_range})
        return spec_from_dict(facts, join_location(self.location, MANIFEST_NAME))

    def shard_url(self, index: int) -> str:
        return join_location(self.location, self.shards[index].name)

    def to_json(self) -> str:
        data = asdict(self)
        del data["location"]
        return json.dumps(data, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str, location: str) -> SplitManifest:
        where = join_location(location, MANIFEST_NAME)
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
                raise DataError(
                    f"{where} is not an {FORMAT_NAME} v{FORMAT_VERSION} manifest "
                    f"(format={data.get('format')!r}, version={data.get('version')!r}); rebuild the shards "
                    "with `python -m egmf.shards build ...`"
                )
            data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
            manifest = cls(**data, location=location)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{where} is not a valid manifest ({exc}); rebuild the split") from None
        unsafe = [shard.name for shard in manifest.shards if not SHARD_NAME.fullmatch(shard.name)]
        if unsafe:
            # A shard name is joined to the root and, for a pipe: root, handed to a shell: only plain tar file names
            # stay inside the split's folder and out of the command.
            raise DataError(
                f"{where} names shards that are not plain .tar file names ({', '.join(map(repr, unsafe[:3]))}); the "
                "manifest was altered or damaged: rebuild the split"
            )
        if manifest.num_samples < 1 or not manifest.shards:
            raise DataError(f"{where}: the split holds no samples; rebuild it from an input that has some")
        if sum(s.num_samples for s in manifest.shards) != manifest.num_samples or any(
            s.num_samples < 1 for s in manifest.shards
        ):
            raise DataError(f"{where}: shard sample counts do not add up to num_samples; rebuild the split")
        return manifest


def join_location(location: str, name: str) -> str:
    if is_url(location):
        return f"{location.rstrip('/')}/{name}"
    return os.path.join(location, name)


def is_url(location: str) -> bool:
    """True for what webdataset's gopen opens (http://, pipe:, ...), False for a local path."""
    return "://" in location or location.startswith("pipe:")


def split_location(root: str, dataset: str, split: str) -> str:
    return join_location(join_location(root, dataset), split)


def read_bytes(url: str) -> bytes:
    """Read a local path or any URL webdataset can open (http, pipe:, ...)."""
    if not is_url(url):
        with open(url, "rb") as f:
            return f.read()
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        return stream.read()


def load_manifest(root: str, dataset: str, split: str) -> SplitManifest:
    """Read ROOT/DATASET/SPLIT/manifest.json, or a DataError that says how to create it."""
    location = split_location(root, dataset, split)
    where = join_location(location, MANIFEST_NAME)
    try:
        text = read_bytes(where).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise MissingManifest(
            f"no shards for {dataset}/{split}: cannot read {where} ({exc}). Build them with "
            f"`python -m egmf.shards build ... --out {root}` (or `python -m egmf.shards demo --out {root}` "
            "for the demo sets)"
        ) from None
    manifest = SplitManifest.from_json(text, location)
    if (manifest.dataset, manifest.split) != (dataset, split):
        raise DataError(f"{where} describes {manifest.dataset}/{manifest.split}, expected {dataset}/{split}")
    return manifest


def find_manifests(root: str) -> list[SplitManifest]:
    """Every split under a local shard root, sorted by dataset then split order."""
    order = {"train": 0, "valid": 1, "test": 2}
    found = []
    for dirpath, _, filenames in os.walk(root):
        if MANIFEST_NAME in filenames:
            with open(os.path.join(dirpath, MANIFEST_NAME), encoding="utf-8") as f:
                found.append(SplitManifest.from_json(f.read(), dirpath))
    return sorted(found, key=lambda m: (m.dataset, order.get(m.split, 9), m.split))
