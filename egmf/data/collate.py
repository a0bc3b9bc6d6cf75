"""Pipeline stages "map to tensors" and "batch and collate".

A batch holds samples of one dataset (feature dims differ between datasets).
Each modality comes padded ([B, L, D] + lengths + mask) and in the form
variable-length attention wants: `cu_seqlens` (int32 [B + 1], cumulative frame
counts) and `max_len`, so `values[mask]` is the packed [total, D] sequence.

Truncation policy: a sequence longer than `max_frames` keeps `max_frames`
frames. "uniform" (default) keeps evenly spaced frames over the whole sequence,
so an event anywhere in the utterance and the relative timing of events
survive; "head" keeps the first `max_frames` frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from egmf.datasets import CLASSIFICATION
from egmf.shards.format import Sample
from egmf.shards.manifest import SplitManifest

TRUNCATION_POLICIES = ("uniform", "head")

FeatureAllocator = Callable[[tuple[int, ...], type], np.ndarray]
"""Gives collate the array a modality's padded values go into, as `np.empty(shape, dtype)` does (the default).
A loader worker passes one that hands out its shared-memory slot (egmf/data/transport.py), so a batch is padded
straight into the memory it crosses to the training process in."""


@dataclass
class Features:
    """One modality of a batch."""

    values: torch.Tensor
    """[B, L, D] float16, zero after each sample's length."""
    lengths: torch.Tensor
    """[B] int64 frame counts (>= 1)."""
    mask: torch.Tensor
    """[B, L] bool, True on real frames."""
    cu_seqlens: torch.Tensor
    """[B + 1] int32 cumulative lengths, as flash-attn's varlen kernels take them."""
    max_len: int


@dataclass
class Batch:
    dataset: str
    split: str
    lang: str
    task: str
    ids: list[str]
    texts: list[str]
    labels: list
    """Class names (classification) or scores (regression), as stored."""
    target: torch.Tensor
    """[B] int64 class index, or float32 score."""
    valid: torch.Tensor
    """[B] bool; False marks padding samples that must not be scored."""
    audio: Features
    vision: Features
    loader_state: dict | None = None
    """Set by the worker that made the batch; the loader takes it off."""

    def __len__(self) -> int:
        return len(self.ids)

    def map_tensors(self, fn) -> Batch:
        """A copy with `fn` applied to every tensor (e.g. `.to(device)`, `.pin_memory()`) or numpy array."""

        def convert(value):
            if isinstance(value, (torch.Tensor, np.ndarray)):
                return fn(value)
            if isinstance(value, Features):
                return Features(*(convert(getattr(value, f.name)) for f in fields(value)))
            return value

        return Batch(*(convert(getattr(self, f.name)) for f in fields(self)))

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self.map_tensors(lambda t: t.pin_memory())

    def __reduce__(self):
        # DataLoader workers would otherwise send each of the ~10 tensors through its own
        # shared-memory segment (about 0.5 ms each); pickled inline as numpy, a whole
        # batch costs about as much as one segment. See docs/benchmarks.md.
        as_numpy = self.map_tensors(lambda t: t.numpy())
        return _batch_from_numpy, tuple(getattr(as_numpy, f.name) for f in fields(self))


def _batch_from_numpy(*values) -> Batch:
    return Batch(*values).map_tensors(torch.from_numpy)


def truncate_frames(array: np.ndarray, max_frames: int, policy: str) -> np.ndarray:
    if array.shape[0] <= max_frames:
        return array
    if policy == "head":
        return array[:max_frames]
    keep = np.linspace(0, array.shape[0] - 1, max_frames).round().astype(np.int64)
    return array[keep]


def collate_features(
    arrays: list[np.ndarray], max_frames: int, policy: str, allocate: FeatureAllocator = np.empty
) -> Features:
    arrays = [truncate_frames(a, max_frames, policy) for a in arrays]
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    max_len = int(lengths.max())
    # Each element is written once: the frames, then zeros after them (np.zeros would write every padded
    # batch twice; CHERMA batches are about 17 MB). This also clears what a reused buffer held before.
    values = allocate((len(arrays), max_len, arrays[0].shape[1]), arrays[0].dtype)
    for row, array in enumerate(arrays):
        values[row, : array.shape[0]] = array
        values[row, array.shape[0] :] = 0
    cu_seqlens = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    lengths_t = torch.from_numpy(lengths)
    return Features(
        values=torch.from_numpy(values),
        lengths=lengths_t,
        mask=torch.arange(max_len)[None, :] < lengths_t[:, None],
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_len=max_len,
    )


def collate(
    samples: list[Sample],
    manifest: SplitManifest,
    max_audio_frames: int,
    max_vision_frames: int,
    truncation: str = "uniform",
    valid: list[bool] | None = None,
    allocate: FeatureAllocator = np.empty,
) -> Batch:
    labels = [s.meta["label"] for s in samples]
    if not manifest.labeled:  # no targets: only decoding reads an unlabeled split
        target = torch.full((len(samples),), -1 if manifest.task == CLASSIFICATION else float("nan"))
    elif manifest.task == CLASSIFICATION:
        target = torch.tensor([manifest.labels.index(label) for label in labels], dtype=torch.int64)
    else:
        target = torch.tensor(labels, dtype=torch.float32)
    return Batch(
        dataset=manifest.dataset,
        split=manifest.split,
        lang=manifest.lang,
        task=manifest.task,
        ids=[s.meta["id"] for s in samples],
        texts=[s.meta["text"] for s in samples],
        labels=labels,
        target=target,
        valid=torch.tensor(valid if valid is not None else [True] * len(samples), dtype=torch.bool),
        audio=collate_features([s.audio for s in samples], max_audio_frames, truncation, allocate),
        vision=collate_features([s.vision for s in samples], max_vision_frames, truncation, allocate),
    )


def padding_batch(manifest: SplitManifest, allocate: FeatureAllocator = np.empty) -> Batch:
    """A one-sample batch with valid=False, for ranks that ran out of evaluation data."""
    label = None if not manifest.labeled else manifest.labels[0] if manifest.labels else 0.0
    meta = {"id": "", "text": "", "label": label}
    sample = Sample(meta, np.zeros((1, manifest.audio_dim), np.float16), np.zeros((1, manifest.vision_dim), np.float16))
    return collate([sample], manifest, 1, 1, valid=[False], allocate=allocate)
