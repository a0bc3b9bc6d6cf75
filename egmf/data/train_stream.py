"""The training stream of one (rank, worker): resampled shards, mixed datasets, resumable.

Stages, per worker: shard list (from the manifests) -> seeded resampling of
shards (the per-rank/per-worker seed replaces "split by node/worker": every
worker draws its own shards, with replacement) -> tar to samples -> sample
shuffle (K open shards read in a random interleaving) -> decode -> validate ->
map to tensors + batch and collate.

Why this shape: resampling lets every rank run the same, fixed number of
batches whatever the shard counts (webdataset #194, #278), and its whole state
is small -- one RNG state plus (shard, offset) of each open shard. Every batch
carries that snapshot, so a resumed run reopens the same shards at the same
offsets (skipping undecoded) and continues the stream instead of replaying it.

Global batch g of an epoch comes from virtual worker g % W (DataLoader takes
workers in turn). When resuming at step s, real worker i plays virtual worker
(s + i) % W, so the order continues exactly.

Which dataset batch g comes from is drawn from (seed, epoch, g) alone, the same
on every rank: each dataset has its own feature front end, and ZeRO-2 reduces
gradients bucket by bucket in the order their hooks fire, so every rank must
run the same graph at the same step (different graphs would pair up different
gradients in the collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from egmf.data.collate import Batch, collate
from egmf.data.tar_samples import BadSamples, RawSample, decode_valid, read_shard
from egmf.shards.manifest import SplitManifest

_MIXING_STREAM = 0x6D6978  # keeps the mixing draws apart from the shard draws seeded with the same numbers


@dataclass
class StreamSettings:
    batch_size: int
    max_audio_frames: int
    max_vision_frames: int
    truncation: str
    open_shards: int
    max_bad_samples: int


class _OpenShard:
    def __init__(self, manifest: SplitManifest, index: int, offset: int, bad: BadSamples):
        self.index, self.offset = index, offset
        self.samples = read_shard(manifest.shard_url(index), manifest.shards[index].num_samples, bad, start=offset)


class ShardInterleaver:
    """Resampled shards of one dataset, K open at a time, read in a random interleaving."""

    def __init__(
        self,
        manifest: SplitManifest,
        num_open: int,
        rng: np.random.Generator,
        bad: BadSamples,
        positions: list[list[int]] = (),
    ):
        self.manifest, self.num_open, self.rng, self.bad = manifest, num_open, rng, bad
        self.open = [_OpenShard(manifest, index, offset, bad) for index, offset in positions]

    def positions(self) -> list[list[int]]:
        return [[shard.index, shard.offset] for shard in self.open]

    def next_sample(self) -> RawSample:
        while True:
            while len(self.open) < self.num_open:
                index = int(self.rng.integers(len(self.manifest.shards)))
                self.open.append(_OpenShard(self.manifest, index, 0, self.bad))
            pick = int(self.rng.integers(len(self.open)))
            shard = self.open[pick]
            raw = next(shard.samples, None)
            if raw is None:
                del self.open[pick]
                continue
            shard.offset = raw.offset + 1
            return raw


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank, split over W workers."""

    def __init__(
        self,
        manifests: list[SplitManifest],
        weights: list[float],
        settings: StreamSettings,
        *,
        seed: int,
        epoch: int,
        rank: int,
        num_workers: int,
        steps_per_epoch: int,
        start_step: int = 0,
        snapshots: dict[int, dict] | None = None,
        reseed: int = 0,
    ):
        self.manifests, self.settings = manifests, settings
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.num_workers, self.steps_per_epoch, self.start_step = max(1, num_workers), steps_per_epoch, start_step
        self.snapshots = snapshots or {}
        self.reseed = reseed
        """Non-zero when resuming without usable snapshots: fresh draws instead of a replay."""

    def __iter__(self):
        info = get_worker_info()
        real_worker = info.id if info is not None else 0
        virtual = (self.start_step + real_worker) % self.num_workers
        first = (self.start_step + real_worker) // self.num_workers
        total = (self.steps_per_epoch - virtual + self.num_workers - 1) // self.num_workers
        state = self._restore(virtual, first)
        for _ in range(first, total):
            yield self._next_batch(state)

    def _restore(self, virtual: int, first: int) -> _WorkerState:
        snapshot = self.snapshots.get(virtual)
        if snapshot is None:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, virtual, self.reseed])
            return _WorkerState(self, virtual, rng, batches=0, bad_samples=0, positions=[[]] * len(self.manifests))
        assert snapshot["batches"] == first, (snapshot["batches"], first)
        rng = np.random.default_rng()
        rng.bit_generator.state = snapshot["rng"]
        return _WorkerState(
            self, virtual, rng, snapshot["batches"], snapshot["bad_samples"], positions=snapshot["open_shards"]
        )

    def dataset_of_step(self, step: int) -> int:
        """Index of the dataset that global batch `step` of this epoch comes from: the same on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch, self.reseed, step, _MIXING_STREAM])
        return int(rng.choice(len(self.manifests), p=self.weights))

    def _next_batch(self, state: _WorkerState) -> Batch:
        source = self.dataset_of_step(state.batches * self.num_workers + state.virtual)
        manifest, interleaver = self.manifests[source], state.interleavers[source]
        samples = []
        while len(samples) < self.settings.batch_size:
            sample = decode_valid(interleaver.next_sample(), manifest, state.bad)
            if sample is not None:
                samples.append(sample)
        s = self.settings
        batch = collate(samples, manifest, s.max_audio_frames, s.max_vision_frames, s.truncation)
        state.batches += 1
        batch.loader_state = state.snapshot()
        return batch


class _WorkerState:
    """What one worker carries from batch to batch; `snapshot()` is all of it, JSON-able."""

    def __init__(
        self,
        stream: TrainStream,
        virtual: int,
        rng: np.random.Generator,
        batches: int,
        bad_samples: int,
        positions: list[list[list[int]]],
    ):
        self.virtual, self.rng, self.batches = virtual, rng, batches
        self.bad = BadSamples(stream.settings.max_bad_samples, bad_samples)
        self.interleavers = [
            ShardInterleaver(manifest, stream.settings.open_shards, rng, self.bad, pos)
            for manifest, pos in zip(stream.manifests, positions, strict=True)
        ]

    def snapshot(self) -> dict:
        """Everything needed to continue this worker's stream after the batch just made (JSON-able)."""
        return {
            "worker": self.virtual,
            "batches": self.batches,
            "rng": self.rng.bit_generator.state,
            "open_shards": [interleaver.positions() for interleaver in self.interleavers],
            "bad_samples": self.bad.count,
        }
