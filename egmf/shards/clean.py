"""Cleaning a raw record from a public release into a sample the shards can hold.

Non-finite feature values become 0 and values beyond float16 are clipped, both
counted; trailing padding is trimmed with the release's lengths; anything a
user must fix (empty text, unknown label, a feature dim that differs within a
split, a bad length) is a DataError naming the sample and the fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from egmf.datasets import DatasetSpec
from egmf.errors import DataError
from egmf.shards.format import FEATURE_DTYPE, MODALITIES, Sample
from egmf.shards.stats import FeatureStats

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class RawRecord:
    """One sample as read from a public release, before cleaning."""

    id: str
    text: object
    label: object
    audio: object
    vision: object
    audio_len: int | None = None
    """Valid frame count from the release, used to trim trailing padding."""
    vision_len: int | None = None


@dataclass
class BuildReport:
    """What cleaning changed in one split; stored in the manifest and printed."""

    samples: int = 0
    fixed: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"samples": self.samples, **dict(sorted(self.fixed.items()))}


def clean_record(
    record: RawRecord,
    spec: DatasetSpec,
    split: str,
    dims: dict[str, int],
    report: BuildReport,
    label_map: dict[str, str] | None = None,
    stats: dict[str, FeatureStats] | None = None,
    labeled: bool = True,
) -> Sample:
    """Validate and normalise one record; `dims` fixes the feature dims of the split on first use; `stats`
    (per modality) gathers the split's feature statistics; an unlabeled split's samples carry the label None."""
    sid = str(record.id)
    if not isinstance(record.text, str) or not record.text.strip():
        raise DataError(
            f"{spec.name}/{split} sample {sid!r}: empty or missing text ({record.text!r}); "
            "remove the sample from the input or fill in its transcript"
        )
    raw_label = label_map.get(str(record.label), record.label) if label_map else record.label
    label = spec.canonical_label(raw_label, f"{spec.name}/{split} {sid}") if labeled else None
    features = {}
    for modality in MODALITIES:
        length = getattr(record, f"{modality}_len")
        features[modality] = clean_features(
            getattr(record, modality),
            length,
            modality,
            f"{spec.name}/{split} sample {sid!r}",
            dims,
            report,
            stats.get(modality) if stats else None,
        )
    report.samples += 1
    meta = {
        "dataset": spec.name,
        "split": split,
        "id": sid,
        "lang": spec.lang,
        "task": spec.task,
        "text": record.text.strip(),
        "label": label,
    }
    return Sample(meta, features["audio"], features["vision"])


def clean_features(
    array: object,
    length: int | None,
    modality: str,
    where: str,
    dims: dict[str, int],
    report: BuildReport,
    stats: FeatureStats | None = None,
) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{where}: {modality} features have shape {list(array.shape)} ({array.dtype}); expected a numeric "
            "[frames, dim] array. Check the input layout (docs/data.md)"
        )
    expected_dim = dims.setdefault(modality, array.shape[1])
    if array.shape[1] != expected_dim:
        raise DataError(
            f"{where}: {modality} dim is {array.shape[1]} but the split's is {expected_dim} (from the dataset's "
            "spec, or else its first sample); all samples of a split share feature dims. Re-extract this "
            "sample's features or drop it"
        )
    if length is not None:
        length = int(length)
        if not 0 <= length <= array.shape[0]:
            raise DataError(
                f"{where}: {modality} length {length} is outside [0, {array.shape[0]}] (the array's frames); "
                "fix the length field or the array"
            )
        report.fixed[f"{modality}_padding_frames_trimmed"] += array.shape[0] - length
        array = array[:length]
    if array.shape[0] == 0:
        # Attention needs at least one frame: keep a single zero frame and say so.
        report.fixed[f"{modality}_zero_length_samples"] += 1
        array = np.zeros((1, expected_dim), dtype=np.float32)
    elif stats is not None:  # a real sample (not the stand-in frame above): its finite values count
        stats.add(array.astype(np.float32), np.isfinite(array))
    array = array.astype(np.float32)
    nonfinite = ~np.isfinite(array)
    if nonfinite.any():
        report.fixed[f"{modality}_nonfinite_zeroed"] += int(nonfinite.sum())
        array[nonfinite] = 0.0
    too_large = np.abs(array) > FLOAT16_MAX
    if too_large.any():
        report.fixed[f"{modality}_clipped_to_float16"] += int(too_large.sum())
        np.clip(array, -FLOAT16_MAX, FLOAT16_MAX, out=array)
    return array.astype(FEATURE_DTYPE)
