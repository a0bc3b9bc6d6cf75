"""Turn raw records into clean samples and write them as WebDataset shards.

Guarantees:
- Deterministic: the same records and options give byte-identical shards
  (fixed tar header fields, fixed member order, seeded shuffle of train).
- Atomic: each shard is written as `*.tar.partial` and renamed when complete;
  a split is built in a hidden folder and swapped in whole, manifest last.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from egmf.datasets import CLASSIFICATION, DatasetSpec
from egmf.errors import DataError
from egmf.shards.format import FEATURE_DTYPE, MODALITIES, Sample, encode_sample, sample_key
from egmf.shards.manifest import ShardInfo, SplitManifest

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
class ShardLimits:
    max_samples: int | None = None
    max_bytes: int | None = None


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
) -> Sample:
    """Validate and normalise one record; `dims` fixes the feature dims of the split on first use."""
    sid = str(record.id)
    if not isinstance(record.text, str) or not record.text.strip():
        raise DataError(
            f"{spec.name}/{split} sample {sid!r}: empty or missing text ({record.text!r}); "
            "remove the sample from the input or fill in its transcript"
        )
    raw_label = label_map.get(str(record.label), record.label) if label_map else record.label
    label = spec.canonical_label(raw_label, f"{spec.name}/{split} {sid}")
    features = {}
    for modality in MODALITIES:
        length = getattr(record, f"{modality}_len")
        features[modality] = clean_features(
            getattr(record, modality), length, modality, f"{spec.name}/{split} sample {sid!r}", dims, report
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
    array: object, length: int | None, modality: str, where: str, dims: dict[str, int], report: BuildReport
) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{where}: {modality} features have shape {list(array.shape)} ({array.dtype}); expected a numeric "
            "[frames, dim] array. Check the input layout (DESIGN.md §3)"
        )
    expected_dim = dims.setdefault(modality, array.shape[1])
    if array.shape[1] != expected_dim:
        raise DataError(
            f"{where}: {modality} dim is {array.shape[1]} but earlier samples of this split have "
            f"{expected_dim}; all samples of a split must share feature dims. Re-extract this sample's "
            "features or drop it"
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


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.num_bytes


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed header fields make builds byte-identical
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class SplitWriter:
    """Writes one split's samples into size-limited shards under a hidden build folder."""

    def __init__(self, out_dir: str, spec: DatasetSpec, split: str, limits: ShardLimits):
        self.spec, self.split, self.limits = spec, split, limits
        self.final_dir = os.path.join(out_dir, spec.name, split)
        self.build_dir = os.path.join(out_dir, spec.name, f".{split}.building-{os.getpid()}")
        shutil.rmtree(self.build_dir, ignore_errors=True)
        os.makedirs(self.build_dir)
        self.shards: list[ShardInfo] = []
        self._tar = self._file = self._hasher = None
        self._count = 0
        self.lengths = {m: [] for m in MODALITIES}
        self.labels: list = []

    def add(self, sample: Sample) -> None:
        members = encode_sample(sample)
        size = sum(len(data) + 1024 for data in members.values())  # + header and padding, roughly
        if self._tar is None or self._is_full(size):
            self._close_shard()
            self._open_shard()
        key = sample_key(self.spec.name, self.split, self._count)
        for suffix, data in members.items():
            self._tar.addfile(*_tar_member(f"{key}.{suffix}", data))
        self._count += 1
        self.shards[-1].num_samples += 1
        for modality in MODALITIES:
            self.lengths[modality].append(getattr(sample, modality).shape[0])
        self.labels.append(sample.meta["label"])

    def _is_full(self, next_size: int) -> bool:
        current = self.shards[-1]
        if self.limits.max_samples and current.num_samples >= self.limits.max_samples:
            return True
        return bool(self.limits.max_bytes) and self._hasher.num_bytes + next_size > self.limits.max_bytes

    def _open_shard(self) -> None:
        name = f"{self.spec.name}-{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(ShardInfo(name, 0, 0, ""))
        self._file = open(os.path.join(self.build_dir, name + ".partial"), "wb")
        self._hasher = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        shard = self.shards[-1]
        shard.num_bytes, shard.sha256 = self._hasher.num_bytes, self._hasher.sha256.hexdigest()
        path = os.path.join(self.build_dir, shard.name)
        os.replace(path + ".partial", path)
        self._tar = None

    def finish(self, dims: dict[str, int], report: BuildReport, source: dict) -> SplitManifest:
        """Close the last shard, write the manifest, and swap the split into place."""
        self._close_shard()
        if not self.shards:
            raise DataError(f"{self.spec.name}/{self.split}: no samples to write; check the input file")
        manifest = SplitManifest(
            dataset=self.spec.name,
            split=self.split,
            lang=self.spec.lang,
            task=self.spec.task,
            num_samples=self._count,
            audio_dim=dims["audio"],
            vision_dim=dims["vision"],
            shards=self.shards,
            labels=list(self.spec.labels),
            label_range=list(self.spec.label_range) if self.spec.label_range else None,
            label_stats=label_stats(self.labels, self.spec),
            length_stats=length_stats(self.lengths),
            build_report=report.as_dict(),
            source=source,
            location=self.final_dir,
        )
        write_atomically(os.path.join(self.build_dir, "manifest.json"), manifest.to_json().encode("utf-8"))
        old_dir = self.build_dir.replace(".building-", ".old-")
        if os.path.exists(self.final_dir):
            os.replace(self.final_dir, old_dir)
        os.replace(self.build_dir, self.final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        shutil.rmtree(self.build_dir, ignore_errors=True)


def write_atomically(path: str, data: bytes) -> None:
    with open(path + ".partial", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)


def length_stats(lengths: dict[str, list[int]]) -> dict:
    stats = {}
    for modality, values in lengths.items():
        values = np.asarray(values)
        stats[modality] = {
            "min": int(values.min()),
            "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)),
            "max": int(values.max()),
            "mean": round(float(values.mean()), 2),
        }
    return stats


def label_stats(labels: list, spec: DatasetSpec) -> dict:
    if spec.task == CLASSIFICATION:
        counts = Counter(labels)
        return {name: counts.get(name, 0) for name in spec.labels}
    values = np.asarray(labels, dtype=np.float64)
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std()), 4),
    }


def write_split(
    records,
    spec: DatasetSpec,
    split: str,
    out_dir: str,
    limits: ShardLimits,
    source: dict,
    shuffle_seed: int | None = None,
    label_map: dict[str, str] | None = None,
) -> SplitManifest:
    """Clean `records` (a list) and write them as one split; on any error nothing is left behind."""
    order = list(range(len(records)))
    if shuffle_seed is not None:
        # Public releases group samples by video; shuffling train at build time keeps
        # consecutive samples of a shard independent, which the loader relies on.
        order = np.random.default_rng(shuffle_seed).permutation(len(records)).tolist()
    writer = SplitWriter(out_dir, spec, split, limits)
    dims: dict[str, int] = {}
    report = BuildReport()
    try:
        for index in order:
            writer.add(clean_record(records[index], spec, split, dims, report, label_map))
        return writer.finish(dims, report, source)
    except BaseException:
        writer.abort()
        raise
