"""Loaders the trainer uses: `TrainLoader` (resumable, equal steps on all ranks) and `EvalLoader`.

Both take the rank and world size as arguments and need no process group, so
one code path serves `deepspeed`, `torchrun`, `srun` and a single CPU process.

    loader = TrainLoader(cfg.data, rank, world_size)
    loader.load_state_dict(saved)          # optional: continue a run
    for batch in loader: ...               # len(loader) batches, the same on every rank
    saved = loader.state_dict()            # after any batch: where the stream stands
"""

from __future__ import annotations

import logging
import math

from torch.utils.data import IterableDataset

from egmf.data.collate import padding_batch
from egmf.data.config import DataConfig
from egmf.data.eval_stream import EvalStream, eval_steps
from egmf.data.train_stream import StreamSettings, TrainStream
from egmf.data.transport import max_batch_bytes, run_in_workers
from egmf.errors import DataError
from egmf.shards.manifest import SplitManifest, load_manifest

logger = logging.getLogger("egmf.data")


def stream_settings(cfg: DataConfig) -> StreamSettings:
    return StreamSettings(
        cfg.batch_size,
        cfg.max_audio_frames,
        cfg.max_vision_frames,
        cfg.truncation,
        cfg.open_shards,
        cfg.max_bad_samples,
    )


def batches_from(stream: IterableDataset, cfg: DataConfig, manifests: list[SplitManifest]):
    slot_bytes = max_batch_bytes(manifests, cfg.batch_size, cfg.max_audio_frames, cfg.max_vision_frames)
    return run_in_workers(stream, cfg.num_workers, cfg.prefetch_batches, slot_bytes)


class _BadSampleTotal:
    """Sums the bad-sample counts that each worker reports with its batches, on top of the count `carried` over
    from earlier epochs (workers count from 0 in each epoch; the limit is for the whole run)."""

    def __init__(self, limit: int, carried: int = 0):
        self.limit, self.by_worker, self.carried = limit, {}, carried

    def update(self, loader_state: dict) -> None:
        self.by_worker[loader_state["worker"]] = loader_state["bad_samples"]
        if self.total > self.limit:
            raise DataError(
                f"{self.total} bad samples skipped on this rank, more than data.max_bad_samples={self.limit}; "
                "see the warnings above for where. Check the shards with `python -m egmf.shards inspect ROOT "
                "--verify`, or raise data.max_bad_samples"
            )

    @property
    def total(self) -> int:
        return self.carried + sum(self.by_worker.values())


def batches_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """Micro-batches each rank yields per epoch of `samples` training samples (at least one)."""
    return max(1, math.ceil(samples / (batch_size * world_size)))


class TrainLoader:
    """Mixed, resampled training batches; every rank yields exactly `len(self)` per epoch."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifests = [load_manifest(cfg.root, name, "train") for name in cfg.train]
        self.weights = list(cfg.train.values())
        samples = cfg.samples_per_epoch or sum(m.num_samples for m in self.manifests)
        self.steps_per_epoch = batches_per_epoch(samples, cfg.batch_size, world_size)
        self.epoch, self.step = 0, 0
        self.snapshots: dict[int, dict] = {}
        self.reseed = 0
        self.bad = _BadSampleTotal(cfg.max_bad_samples)
        warn_if_starved(self.manifests, world_size, cfg.num_workers)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        """The rest of the current epoch; the next call starts the next epoch."""
        stream = TrainStream(
            self.manifests,
            self.weights,
            stream_settings(self.cfg),
            seed=self.cfg.seed,
            epoch=self.epoch,
            rank=self.rank,
            num_workers=self.cfg.num_workers,
            steps_per_epoch=self.steps_per_epoch,
            start_step=self.step,
            snapshots=self.snapshots,
            reseed=self.reseed,
        )
        for batch in batches_from(stream, self.cfg, self.manifests):
            state, batch.loader_state = batch.loader_state, None
            self.snapshots[state["worker"]] = state
            self.bad.update(state)
            self.step += 1
            yield batch
        self.epoch, self.step, self.snapshots, self.reseed = self.epoch + 1, 0, {}, 0
        self.bad = _BadSampleTotal(self.cfg.max_bad_samples, self.bad.total)

    def state_dict(self) -> dict:
        """Where this rank's stream stands (JSON-able); save it with each checkpoint."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": max(1, self.cfg.num_workers),
            "steps_per_epoch": self.steps_per_epoch,
            "datasets": list(self.cfg.train),
            "snapshots": {str(k): v for k, v in self.snapshots.items()},
            "reseed": self.reseed,
            "bad_samples_before_epoch": self.bad.carried,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.bad = _BadSampleTotal(self.cfg.max_bad_samples, state.get("bad_samples_before_epoch", 0))
        same_stream = all(
            state[key] == value
            for key, value in (
                ("seed", self.cfg.seed),
                ("rank", self.rank),
                ("world_size", self.world_size),
                ("num_workers", max(1, self.cfg.num_workers)),
                ("steps_per_epoch", self.steps_per_epoch),
                ("datasets", list(self.cfg.train)),
            )
        )
        if same_stream:
            self.snapshots = {int(k): v for k, v in state["snapshots"].items()}
            self.reseed = state["reseed"]
        else:
            # The saved positions belong to another layout of the stream: keep the epoch
            # and step, draw fresh shards for the rest of the epoch (no replay of its start).
            logger.warning(
                "data layout changed since the checkpoint (seed, ranks, workers, datasets or epoch "
                "size); continuing epoch %d at step %d with freshly drawn shards",
                self.epoch,
                self.step,
            )
            self.snapshots, self.reseed = {}, self.step + 1
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self.snapshots, self.reseed = self.epoch + 1, 0, {}, 0

    @property
    def bad_samples(self) -> int:
        return self.bad.total


class EvalLoader:
    """One dataset split for evaluation: each sample once over all ranks; `len(self)` batches on every rank.

    Batches past this rank's share are padding (`batch.valid` all False).
    """

    def __init__(
        self,
        cfg: DataConfig,
        dataset: str,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        manifest: SplitManifest | None = None,
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = manifest or load_manifest(cfg.root, dataset, split)
        self.steps = eval_steps(self.manifest.num_samples, world_size, cfg.num_workers, cfg.batch_size)
        self.bad = _BadSampleTotal(cfg.max_bad_samples)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        stream = EvalStream(
            self.manifest,
            stream_settings(self.cfg),
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.cfg.num_workers,
        )
        count = 0
        for item in batches_from(stream, self.cfg, [self.manifest]):
            if isinstance(item, dict):  # a worker's final bad-sample count, not a batch
                self.bad.update(item)
                continue
            state, item.loader_state = item.loader_state, None
            self.bad.update(state)
            count += 1
            yield item
        for _ in range(count, self.steps):
            yield padding_batch(self.manifest)

    @property
    def bad_samples(self) -> int:
        return self.bad.total


def warn_if_starved(manifests: list[SplitManifest], world_size: int, num_workers: int) -> None:
    readers = world_size * max(1, num_workers)
    for m in manifests:
        if len(m.shards) < readers:
            logger.warning(
                "%s/%s has %d shard(s) for %d readers (%d rank(s) x %d worker(s)): workers will read the same "
                "shards and batches will repeat samples. Rebuild it with a smaller --shard-samples/--shard-bytes "
                "(at least %d shards)",
                m.dataset,
                m.split,
                len(m.shards),
                readers,
                world_size,
                max(1, num_workers),
                readers,
            )
