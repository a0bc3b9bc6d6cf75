"""The training stream: one sample order for the whole run, whatever the number of ranks and workers.

Stages: epoch plan (which dataset each optimizer step takes, and that dataset's
next global batch of sample positions) -> this rank's slice of each global
batch, split over its workers -> tar to samples -> decode -> validate -> map to
tensors + batch and collate.

Why this shape: the plan is computed from the manifests' sample counts alone,
so every rank and worker knows every step's samples without reading a byte,
and it does not depend on the number of ranks. Optimizer step g of an epoch
takes the next `global_batch` positions of the sequence of dataset d_g; rank r
takes positions [(a·W + r)·b, +b) of them for its micro-batch a (b: micro-batch,
W: ranks). A run checkpointed on N ranks therefore continues on M ranks with the
same samples in the same global batches, provided the global batch is the same
(set optim.global_batch). The stream's whole state is the epoch, the step and
each dataset's `SampleSequence` state: small, JSON-able, the same on every rank.

Each dataset's sequence is a series of passes over its shards: a seeded shard
permutation, read K shards at a time (data.open_shards) in a seeded
interleaving (the sample shuffle). Sequences continue across epochs, so every
sample is used once per pass. An epoch gives dataset d round(w_d x steps) of
its steps (largest remainder), in a seeded order: with weights proportional to
the datasets' sizes and sizes that are multiples of the global batch, an epoch
uses every sample exactly once.

Which dataset a step comes from is the same on every rank: each dataset has its
own feature front end, and ZeRO-2 reduces gradients bucket by bucket in the
order their hooks fire, so every rank must run the same graph at the same step.

A bad sample (unreadable, truncated away, failing decode or validation) is
dropped from its micro-batch, which is then smaller; a micro-batch with no good
sample comes as a padding batch (`valid` all False) that the trainer skips on
every rank together. Each position belongs to one rank and worker, which alone
reads, decodes and counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from egmf.data.collate import Batch, FeatureAllocator, collate, padding_batch
from egmf.data.tar_samples import BadSamples, RawSample, decode_valid, read_shard
from egmf.shards.manifest import SplitManifest

_ORDER_STREAM = 0x6D6978  # keeps the dataset-order draws apart from the sequences' draws seeded with the same numbers
_NO_LIMIT = 1 << 62


@dataclass
class StreamSettings:
    batch_size: int
    max_audio_frames: int
    max_vision_frames: int
    truncation: str
    open_shards: int
    max_bad_samples: int


class SampleSequence:
    """The order in which one dataset's training samples are used, as (shard, offset) positions, computed from
    the manifest's sample counts: passes over the shards, each a seeded permutation read `num_open` shards at a
    time, the next sample taken from an open shard drawn at random."""

    def __init__(
        self, manifest: SplitManifest, num_open: int, seed: int, dataset_index: int, state: dict | None = None
    ):
        self.sizes = [shard.num_samples for shard in manifest.shards]
        self.num_open = num_open
        self.rng = np.random.default_rng([seed, dataset_index])
        self.passes, self.queue, self.open = 0, [], []
        if state is not None:
            self.passes, self.queue, self.open = state["passes"], list(state["queue"]), [list(p) for p in state["open"]]
            self.rng.bit_generator.state = state["rng"]

    def state_dict(self) -> dict:
        return {
            "passes": self.passes,
            "queue": list(self.queue),
            "open": [list(p) for p in self.open],
            "rng": self.rng.bit_generator.state,
        }

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next `count` positions."""
        taken = []
        while len(taken) < count:
            while len(self.open) < self.num_open and self.queue:
                shard = self.queue.pop(0)
                if self.sizes[shard]:
                    self.open.append([shard, 0])
            if not self.open:  # the pass is used up: the next one
                self.queue = [int(i) for i in self.rng.permutation(len(self.sizes))]
                self.passes += 1
                continue
            pick = int(self.rng.integers(len(self.open)))
            shard, offset = self.open[pick]
            taken.append((shard, offset))
            if offset + 1 == self.sizes[shard]:
                del self.open[pick]
            else:
                self.open[pick][1] = offset + 1
        return taken

    def open_shards(self) -> set[int]:
        return {shard for shard, _ in self.open}


def dataset_order(weights: list[float], steps: int, seed: int, epoch: int) -> list[int]:
    """The dataset index of each optimizer step of an epoch: dataset d gets round(w_d x steps) steps (largest
    remainder, weights normalised), in an order drawn from (seed, epoch) alone -- the same on every rank."""
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights) * steps
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts), kind="stable")[: steps - counts.sum()]:
        counts[index] += 1
    order = np.repeat(np.arange(len(weights)), counts)
    return [int(d) for d in np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(order)]


class _ShardProblems(BadSamples):
    """What goes wrong reading a shard, kept per shard and not counted: only the positions a worker owns count."""

    def __init__(self):
        super().__init__(_NO_LIMIT)
        self.reasons: dict[str, str] = {}

    def add(self, where: str, reason: str, num_samples: int = 1) -> None:
        self.reasons[where] = reason


@dataclass
class _OpenShard:
    samples: Iterator[RawSample]
    """Yields the shard's samples at consecutive offsets from `next_offset` on, until it ends (or breaks off)."""
    next_offset: int


class _ShardReaders:
    """Reads samples of one dataset's shards by position, keeping each shard open while its reads go forward."""

    def __init__(self, manifest: SplitManifest):
        self.manifest = manifest
        self.problems = _ShardProblems()
        self.readers: dict[int, _OpenShard] = {}

    def read(self, shard: int, offset: int) -> RawSample | str:
        """The raw sample at (shard, offset), or why it cannot be read (the shard is unreadable or ends before)."""
        url = self.manifest.shard_url(shard)
        reader = self.readers.get(shard)
        if reader is None or reader.next_offset > offset:
            samples = read_shard(url, self.manifest.shards[shard].num_samples, self.problems, start=offset)
            reader = self.readers[shard] = _OpenShard(samples, offset)
        for raw in reader.samples:  # other readers' samples before `offset` pass undecoded
            if raw.offset == offset:
                reader.next_offset = offset + 1
                return raw
        del self.readers[shard]
        return self.problems.reasons.get(url, "missing from its shard")

    def keep_only(self, shards: set[int]) -> None:
        """Close the shards that the sequence has left (their remaining samples belong to other readers)."""
        for shard in set(self.readers) - shards:
            del self.readers[shard]


class TrainStream(IterableDataset):
    """The rest of one epoch of micro-batches for one rank, split over its workers (worker i makes micro-batches
    i, i + W_k, ... of this stream; the DataLoader takes them in turn)."""

    def __init__(
        self,
        manifests: list[SplitManifest],
        settings: StreamSettings,
        *,
        order: list[int],
        start_step: int,
        sequence_states: list[dict],
        seed: int,
        rank: int,
        world_size: int,
        grad_accum: int,
        num_workers: int,
    ):
        self.manifests, self.settings, self.order, self.start_step = manifests, settings, order, start_step
        self.sequence_states, self.seed = sequence_states, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.num_workers = max(1, num_workers)
        self.allocate_features: FeatureAllocator = np.empty  # a loader worker sets its shared-memory slots

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * self.grad_accum * self.world_size

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        s = self.settings
        sequences = [
            SampleSequence(m, s.open_shards, self.seed, i, state)
            for i, (m, state) in enumerate(zip(self.manifests, self.sequence_states, strict=True))
        ]
        readers = [_ShardReaders(m) for m in self.manifests]
        bad = BadSamples(s.max_bad_samples)
        micro = 0
        for step in range(self.start_step, len(self.order)):
            source = self.order[step]
            positions = sequences[source].take(self.global_batch)
            for accum in range(self.grad_accum):
                if micro % self.num_workers == worker:
                    first = (accum * self.world_size + self.rank) * s.batch_size
                    batch = self._micro_batch(source, positions[first : first + s.batch_size], readers[source], bad)
                    batch.loader_state = {"worker": worker, "bad_samples": bad.count}
                    yield batch
                micro += 1
            readers[source].keep_only(sequences[source].open_shards())

    def _micro_batch(self, source: int, positions, readers: _ShardReaders, bad: BadSamples) -> Batch:
        manifest, s = self.manifests[source], self.settings
        samples = []
        for shard, offset in positions:
            raw = readers.read(shard, offset)
            if isinstance(raw, str):
                bad.add(f"{manifest.shard_url(shard)} sample #{offset}", raw)
                continue
            sample = decode_valid(raw, manifest, bad)
            if sample is not None:
                samples.append(sample)
        if not samples:
            return padding_batch(manifest, self.allocate_features)
        return collate(
            samples, manifest, s.max_audio_frames, s.max_vision_frames, s.truncation, allocate=self.allocate_features
        )
