"""The evaluation stream: every sample exactly once across all ranks and workers.

Stages: shard list (manifest order, no shuffle, no resampling) -> split by node
-> split by worker -> tar to samples -> decode -> validate -> map + collate.

The split is by sample ranges, not whole shards: the split's N samples, in
manifest order, are cut into R x W contiguous ranges that differ by at most one
sample, one per (rank, worker) slot. Each slot opens only the shards its range
touches and skips undecoded to its first sample. So the work is balanced
whatever the shard counts and sizes, and the number of batches of every rank
is known from the manifest alone (`eval_steps`), which lets every rank run the
same number of steps: ranks with fewer batches get padding batches.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from egmf.data.collate import FeatureAllocator, collate
from egmf.data.tar_samples import BadSamples, decode_valid, read_shard
from egmf.data.train_stream import StreamSettings
from egmf.shards.manifest import SplitManifest


def slot_range(num_samples: int, num_slots: int, slot: int) -> tuple[int, int]:
    return slot * num_samples // num_slots, (slot + 1) * num_samples // num_slots


def eval_steps(num_samples: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches every rank runs: the most any rank's slots need."""
    workers = max(1, num_workers)
    per_rank = []
    for rank in range(world_size):
        sizes = [slot_range(num_samples, world_size * workers, rank * workers + w) for w in range(workers)]
        per_rank.append(sum(-(-(end - start) // batch_size) for start, end in sizes))
    return max(per_rank)


class EvalStream(IterableDataset):
    def __init__(
        self, manifest: SplitManifest, settings: StreamSettings, *, rank: int, world_size: int, num_workers: int
    ):
        self.manifest, self.settings = manifest, settings
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.allocate_features: FeatureAllocator = np.empty  # a loader worker sets its shared-memory slots

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.num_workers + worker
        start, end = slot_range(self.manifest.num_samples, self.world_size * self.num_workers, slot)
        bad = BadSamples(self.settings.max_bad_samples)
        batch = []
        for raw in self._samples(start, end, bad):
            sample = decode_valid(raw, self.manifest, bad)
            if sample is not None:
                batch.append(sample)
            if len(batch) == self.settings.batch_size:
                yield self._collate(batch, worker, bad)
                batch = []
        if batch:
            yield self._collate(batch, worker, bad)
        # The final count, also from a worker whose samples were all bad and made no batch.
        yield {"worker": worker, "bad_samples": bad.count}

    def _samples(self, start: int, end: int, bad: BadSamples):
        """Raw samples with global index in [start, end), in manifest order."""
        first = 0  # global index of the current shard's first sample
        for index, shard in enumerate(self.manifest.shards):
            last = first + shard.num_samples
            if first < end and start < last:
                url = self.manifest.shard_url(index)
                yield from read_shard(
                    url, shard.num_samples, bad, start=max(start - first, 0), stop=min(end - first, shard.num_samples)
                )
            first = last

    def _collate(self, samples, worker: int, bad: BadSamples):
        s = self.settings
        batch = collate(
            samples,
            self.manifest,
            s.max_audio_frames,
            s.max_vision_frames,
            s.truncation,
            allocate=self.allocate_features,
        )
        batch.loader_state = {"worker": worker, "bad_samples": bad.count}
        return batch
