"""Readers of the builder's inputs: the public processed releases and the generic JSONL format (their layouts:
docs/data.md).

The releases are Python pickles, so they are read only here, by the offline
builder, from files the user names; shards and the training loader never
unpickle. The JSONL format's arrays are .npy files, read without pickle.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np

from egmf.errors import DataError
from egmf.shards.clean import RawRecord

MMSA_SPLITS = ("train", "valid", "test")
MMSA_REQUIRED = ("raw_text", "audio", "vision", "id", "regression_labels")


def load_trusted_pickle(path: str):
    """Unpickle a user-named release file (pickle can run code: only for trusted files)."""
    if os.path.isdir(path):
        raise DataError(f"--input {path} is a folder; this format reads one release pickle (e.g. unaligned_50.pkl)")
    if not os.path.isfile(path):
        raise DataError(f"input file {path} does not exist; pass the path of the release pickle with --input")
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except Exception as exc:
            raise DataError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from None


def read_mmsa(path: str) -> dict[str, list[RawRecord]]:
    """MOSEI / SIMS-V2 in the MMSA layout: one pickle {split: {field: array[N, ...]}}."""
    data = load_trusted_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict with {', '.join(MMSA_SPLITS)}, got {type(data).__name__}")
    splits = {}
    for split in MMSA_SPLITS:
        if split not in data:
            raise DataError(f"{path}: split {split!r} is missing (found {sorted(data)}); is this an MMSA-layout file?")
        splits[split] = _mmsa_split(data[split], f"{path} [{split}]")
    return splits


def _mmsa_split(fields: dict, where: str) -> list[RawRecord]:
    missing = [name for name in MMSA_REQUIRED if name not in fields]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; MMSA splits need {', '.join(MMSA_REQUIRED)}")
    labels = np.asarray(fields["regression_labels"]).reshape(-1)
    count = len(labels)
    for name in ("raw_text", "audio", "vision", "id", "audio_lengths", "vision_lengths"):
        if name in fields and len(fields[name]) != count:
            raise DataError(f"{where}: field {name!r} has {len(fields[name])} entries but there are {count} labels")
    audio_lengths = fields.get("audio_lengths")
    vision_lengths = fields.get("vision_lengths")
    return [
        RawRecord(
            id=str(fields["id"][i]),
            text=fields["raw_text"][i],
            label=float(labels[i]),
            audio=fields["audio"][i],
            vision=fields["vision"][i],
            audio_len=None if audio_lengths is None else int(audio_lengths[i]),
            vision_len=None if vision_lengths is None else int(vision_lengths[i]),
        )
        for i in range(count)
    ]


def mse_adapter_path(input_dir: str, dataset: str, split: str) -> str:
    names = [f"{dataset}_{split}.pkl"] + ([f"{dataset}_dev.pkl"] if split == "valid" else [])
    for name in names:
        if os.path.isfile(os.path.join(input_dir, name)):
            return os.path.join(input_dir, name)
    raise DataError(f"{input_dir}: no {' or '.join(names)}; the MSE-Adapter layout has {dataset}_train/valid/test.pkl")


def read_mse_adapter(input_dir: str, dataset: str) -> dict[str, list[RawRecord]]:
    """MELD / CHERMA in the MSE-Adapter layout: one pickle per split, a list of dicts."""
    if not os.path.isdir(input_dir):
        what = "is a file" if os.path.exists(input_dir) else "does not exist"
        raise DataError(
            f"--input {input_dir} {what}; this format reads the folder holding {dataset}_train/valid/test.pkl"
        )
    splits = {}
    for split in MMSA_SPLITS:
        path = mse_adapter_path(input_dir, dataset, split)
        items = load_trusted_pickle(path)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a list of samples, got {type(items).__name__}")
        splits[split] = [_mse_adapter_record(item, i, dataset, split, path) for i, item in enumerate(items)]
    return splits


def _mse_adapter_record(item: object, index: int, dataset: str, split: str, path: str) -> RawRecord:
    sid = str(item.get("id", f"{dataset}_{split}_{index:05d}")) if isinstance(item, dict) else f"#{index}"
    where = f"{path} sample {sid!r} (index {index})"
    if not isinstance(item, dict) or not isinstance(item.get("features"), dict) or "label" not in item:
        raise DataError(f"{where}: expected {{'features': {{...}}, 'label': str}}; this is not the MSE-Adapter layout")
    features = item["features"]
    missing = [name for name in ("text", "audio", "video") if name not in features]
    if missing:
        raise DataError(f"{where}: features lack {', '.join(missing)}; each sample needs text, audio and video")
    return RawRecord(
        id=sid,
        text=features["text"],
        label=item["label"],
        audio=features["audio"],
        vision=features["video"],
        audio_len=features.get("audio_len"),
        vision_len=features.get("video_len"),
    )


JSONL_KEYS = ("id", "text", "audio", "vision", "label")


def read_jsonl(path: str) -> tuple[list[RawRecord], bool]:
    """(records, labeled) from the generic format: one JSON object per line with id, text, audio, vision and an
    optional label; audio and vision are paths of .npy arrays [frames, dim] (absolute, or relative to the JSONL
    file) or the arrays inline as nested lists. Either every sample has a label or none has (an unlabeled
    split). Errors name the file, the line and the sample."""
    if os.path.isdir(path):
        raise DataError(f"--input {path} is a folder; the jsonl format reads one .jsonl file per split")
    if not os.path.isfile(path):
        raise DataError(f"--input {path} does not exist; pass the .jsonl file of one split")
    records, seen, with_label = [], {}, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = _jsonl_record(line, where, os.path.dirname(os.path.abspath(path)))
            if record.id in seen:
                raise DataError(f"{where}: id {record.id!r} is already used on line {seen[record.id]}; ids are unique")
            seen[record.id] = number
            with_label.append(record.label is not None)
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no samples (one JSON object per line)")
    if any(with_label) and not all(with_label):
        first = records[with_label.index(False)]
        raise DataError(
            f"{path}: sample {first.id!r} (line {seen[first.id]}) has no label but others have; a split is "
            "either labeled throughout or unlabeled throughout (drop every label for an unlabeled split)"
        )
    return records, all(with_label)


def _jsonl_record(line: str, where: str, base: str) -> RawRecord:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc}); each line is one sample object") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with {', '.join(JSONL_KEYS)}, got {type(item).__name__}")
    unknown = [key for key in item if key not in JSONL_KEYS]
    missing = [key for key in ("id", "text", "audio", "vision") if key not in item]
    if unknown or missing:
        raise DataError(
            f"{where}: "
            + "; ".join(
                [f"unknown key(s) {', '.join(unknown)}"] * bool(unknown)
                + [f"missing {', '.join(missing)}"] * bool(missing)
            )
            + f"; a sample has {', '.join(JSONL_KEYS)} (label optional)"
        )
    if not isinstance(item["id"], str | int) or isinstance(item["id"], bool) or str(item["id"]) == "":
        raise DataError(f"{where}: id {item['id']!r} must be a non-empty string or an integer")
    sid = str(item["id"])
    features = {m: _jsonl_array(item[m], m, f"{where} sample {sid!r}", base) for m in ("audio", "vision")}
    return RawRecord(id=sid, text=item["text"], label=item.get("label"), **features)


def _jsonl_array(value: object, modality: str, where: str, base: str) -> np.ndarray:
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base, value)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(
                f"{where}: {modality} file {path} does not exist (paths are relative to the JSONL file)"
            ) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{where}: {modality} file {path} is not a readable .npy array ({exc})") from None
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {modality} is a list but not a [frames, dim] table of numbers") from None
    raise DataError(
        f"{where}: {modality} must be a .npy path or a [frames, dim] list of numbers, got {type(value).__name__}"
    )
