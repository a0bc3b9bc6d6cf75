"""Write clean samples as WebDataset shards, with the split's manifest.

Guarantees:
- Deterministic: the same records and options give byte-identical shards
  (fixed tar header fields, fixed member order, seeded shuffle of train).
- Atomic: each shard is written as `*.tar.partial` and renamed when complete;
  a split is built in a hidden folder and swapped in whole, manifest last
  (`egmf.atomic`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

from egmf.atomic import partial_folder, publish, start_partial, write_atomically
from egmf.datasets import CLASSIFICATION, DatasetSpec
from egmf.errors import DataError
from egmf.shards.clean import BuildReport, clean_record
from egmf.shards.format import MODALITIES, Sample, encode_sample, sample_key
from egmf.shards.manifest import ShardInfo, SplitManifest
from egmf.shards.sources import read_jsonl
from egmf.shards.stats import FeatureStats
from egmf.shards.texts import text_stats, write_texts


@dataclass
class ShardLimits:
    max_samples: int | None = None
    max_bytes: int | None = None


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

    def __init__(self, out_dir: str, spec: DatasetSpec, split: str, limits: ShardLimits, labeled: bool = True):
        self.spec, self.split, self.limits, self.labeled = spec, split, limits, labeled
        self.final_dir = os.path.join(out_dir, spec.name, split)
        self.build_dir = start_partial(self.final_dir)
        self.shards: list[ShardInfo] = []
        self._tar = self._file = self._hasher = None
        self._count = 0
        self.lengths = {m: [] for m in MODALITIES}
        self.labels: list = []
        self.texts: list[str] = []

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
        self.texts.append(sample.meta["text"])

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

    def finish(
        self,
        dims: dict[str, int],
        report: BuildReport,
        source: dict,
        stats: dict[str, FeatureStats],
        publish_now: bool = True,
    ) -> SplitManifest:
        """Close the last shard, write the manifest, and swap the split into place (`publish_now` False: leave it
        complete in its build folder, for `publish_splits`)."""
        self._close_shard()
        if not self.shards:
            raise DataError(f"{self.spec.name}/{self.split}: no samples to write; check the input file")
        for modality, modality_stats in stats.items():
            if not modality_stats.as_dict().get("frames"):
                raise DataError(
                    f"{self.spec.name}/{self.split}: the {modality} features hold no finite value in any sample "
                    "(all NaN, inf or empty): they are missing, not noisy. Re-extract them"
                )
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
            label_words=dict(self.spec.label_words),
            labeled=self.labeled,
            label_stats=label_stats(self.labels, self.spec) if self.labeled else {},
            length_stats=length_stats(self.lengths),
            text_stats=text_stats(self.texts),
            feature_stats={modality: s.as_dict() for modality, s in stats.items()},
            build_report=report.as_dict(),
            source=source,
            location=self.final_dir,
        )
        write_texts(self.build_dir, self.texts)
        write_atomically(os.path.join(self.build_dir, "manifest.json"), manifest.to_json().encode("utf-8"))
        if publish_now:
            publish(self.build_dir, self.final_dir)
        return manifest

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        shutil.rmtree(self.build_dir, ignore_errors=True)


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
    labeled: bool = True,
    publish_now: bool = True,
) -> SplitManifest:
    """Clean `records` (a list) and write them as one split (`labeled` False: without labels); on any error
    nothing is left behind. `publish_now` False leaves the complete split in its build folder (`write_splits`)."""
    order = list(range(len(records)))
    if shuffle_seed is not None:
        # Public releases group samples by video; shuffling train at build time keeps
        # consecutive samples of a shard independent, which the loader relies on.
        order = np.random.default_rng(shuffle_seed).permutation(len(records)).tolist()
    writer = SplitWriter(out_dir, spec, split, limits, labeled)
    dims = {modality: dim for modality, dim in (("audio", spec.audio_dim), ("vision", spec.vision_dim)) if dim}
    report = BuildReport()
    stats = {modality: FeatureStats() for modality in MODALITIES}
    try:
        for index in order:
            writer.add(clean_record(records[index], spec, split, dims, report, label_map, stats, labeled))
        return writer.finish(dims, report, source, stats, publish_now)
    except BaseException:
        writer.abort()
        raise


def write_splits(
    splits: dict[str, list],
    spec: DatasetSpec,
    out_dir: str,
    limits: ShardLimits,
    source: dict,
    shuffle_seed: int,
    label_map: dict[str, str] | None = None,
) -> list[SplitManifest]:
    """Write every split of one release (train shuffled with `shuffle_seed`), all or none: each split is built in
    its own folder, their feature dims must agree, and only then are they swapped in together. An error in any
    split leaves the folders that were there as they were."""
    built: list[SplitManifest] = []
    try:
        for split, records in splits.items():
            seed = shuffle_seed if split == "train" else None
            built.append(write_split(records, spec, split, out_dir, limits, source, seed, label_map, publish_now=False))
        dims = {(m.audio_dim, m.vision_dim) for m in built}
        if len(dims) > 1:
            found = ", ".join(f"{m.split} audio {m.audio_dim} / vision {m.vision_dim}" for m in built)
            raise DataError(
                f"{spec.name}: the splits have different feature dims ({found}); a model takes one set of dims per "
                "dataset, so the input mixes feature extractions. Re-extract the features consistently"
            )
    except BaseException:
        for manifest in built:
            shutil.rmtree(partial_folder(manifest.location), ignore_errors=True)
        raise
    for manifest in built:
        publish(partial_folder(manifest.location), manifest.location)
    return built


def build_jsonl_split(
    path: str,
    spec: DatasetSpec,
    split: str,
    out: str,
    limits: ShardLimits,
    shuffle_seed: int | None = None,
    label_map: dict[str, str] | None = None,
) -> SplitManifest:
    """One split from a file in the JSONL format, labeled or not as its samples are (egmf-shards and
    egmf-predict --data FILE.jsonl)."""
    records, labeled = read_jsonl(path)
    source = {"format": "jsonl", "input": os.path.abspath(path)}
    return write_split(records, spec, split, out, limits, source, shuffle_seed, label_map, labeled)
