"""What the system knows about each dataset: language, task, labels, feature dims.

Shards store canonical English class names; the builder maps the names found
in public releases (including Chinese ones) onto them through `aliases`.
The demo sets are synthetic (see `egmf.shards.demo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
}

DEMO_DATASETS = ("demo_cls_en", "demo_cls_zh", "demo_reg_en", "demo_reg_zh")
SPLITS = ("train", "valid", "test")


def get_spec(name: str) -> DatasetSpec:
    """The spec for `name`, or a DataError listing the known datasets."""
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(SPECS)}") from None
