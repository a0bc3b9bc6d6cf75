"""Loaders the trainer uses: `TrainLoader` (resumable, equal steps on all ranks) and `EvalLoader`.

Both take the rank and world size as arguments and need no process group, so
one code path serves `deepspeed`, `torchrun`, `srun` and a single CPU process.

    loader = TrainLoader(cfg.data, rank, world_size, grad_accum)
    loader.load_state_dict(saved)          # optional: continue a run, on this or another number of ranks
    for batch in loader: ...               # len(loader) micro-batches, the same on every rank
    saved = loader.state_dict()            # after an optimizer step's last micro-batch: where the stream stands
"""

from __future__ import annotations

import logging
import math

from torch.utils.data import IterableDataset

from egmf.data.collate import padding_batch
from egmf.data.config import DataConfig
from egmf.data.eval_stream import EvalStream, eval_steps
from egmf.data.train_stream import SampleSequence, StreamSettings, TrainStream, dataset_order
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
    from earlier epochs and runs (workers count from 0 in each epoch; the limit is for the whole run)."""

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


def steps_per_epoch(samples: int, global_batch: int) -> int:
    """Optimizer steps per epoch of `samples` training samples (at least one)."""
    return max(1, math.ceil(samples / global_batch))


class TrainLoader:
    """This rank's training micro-batches: `grad_accum` per optimizer step, `len(self)` per epoch on every rank.

    The sample order does not depend on the number of ranks (egmf/data/train_stream.py): a state saved on N ranks
    continues on M ranks with the same global batches when data.batch_size x grad_accum x ranks stays the same.
    `state_dict()` is meant for optimizer-step boundaries (where checkpoints are made)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.cfg, self.rank, self.world_size, self.grad_accum = cfg, rank, world_size, grad_accum
        self.manifests = [load_manifest(cfg.root, name, "train") for name in cfg.train]
        self.weights = list(cfg.train.values())
        self.global_batch = cfg.batch_size * grad_accum * world_size
        samples = cfg.samples_per_epoch or sum(m.num_samples for m in self.manifests)
        self.steps_per_epoch = steps_per_epoch(samples, self.global_batch)
        self.epoch, self.step = 0, 0
        self.sequences = [SampleSequence(m, cfg.open_shards, cfg.seed, i) for i, m in enumerate(self.manifests)]
        self.bad = _BadSampleTotal(cfg.max_bad_samples)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum

    def __iter__(self):
        """The rest of the current epoch; the next call starts the next epoch."""
        order = dataset_order(self.weights, self.steps_per_epoch, self.cfg.seed, self.epoch)
        stream = TrainStream(
            self.manifests,
            stream_settings(self.cfg),
            order=order,
            start_step=self.step,
            sequence_states=[sequence.state_dict() for sequence in self.sequences],
            seed=self.cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            grad_accum=self.grad_accum,
            num_workers=self.cfg.num_workers,
        )
        micro = 0
        for batch in batches_from(stream, self.cfg, self.manifests):
            state, batch.loader_state = batch.loader_state, None
            self.bad.update(state)
            micro += 1
            if micro % self.grad_accum == 0:  # the step's last micro-batch: the stream stands after the step
                self.sequences[order[self.step]].take(self.global_batch)
                self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0
        self.bad = _BadSampleTotal(self.cfg.max_bad_samples, self.bad.total)

    @property
    def epoch_progress(self) -> float:
        """Epochs done, with the current one's fraction."""
        return self.epoch + self.step / self.steps_per_epoch

    def state_dict(self) -> dict:
        """Where the stream stands (JSON-able, the same on every rank but for the bad-sample count); save it with
        each checkpoint."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.cfg.seed,
            "global_batch": self.global_batch,
            "datasets": list(self.cfg.train),
            "weights": self.weights,
            "sequences": [sequence.state_dict() for sequence in self.sequences],
            "bad_samples": self.bad.total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.bad = _BadSampleTotal(self.cfg.max_bad_samples, state.get("bad_samples", 0))
        saved = dict(zip(state["datasets"], state["sequences"], strict=True))
        if state["seed"] != self.cfg.seed:
            saved = {}
        for index, (name, manifest) in enumerate(zip(self.cfg.train, self.manifests, strict=True)):
            if name in saved:
                self.sequences[index] = SampleSequence(
                    manifest, self.cfg.open_shards, self.cfg.seed, index, saved[name]
                )
        same = (state["global_batch"], state["datasets"], state["weights"]) == (
            self.global_batch,
            list(self.cfg.train),
            self.weights,
        )
        if not same or len(saved) != len(self.manifests):
            # Another epoch layout: keep the epoch, the step and every sequence position that still applies
            logger.warning(
                "the data layout changed since the checkpoint (global batch %d -> %d, datasets, weights or "
                "data.seed): epoch %d continues at step %d with another order of datasets; samples may repeat or "
                "be left out in this epoch. Keep optim.global_batch, data.train and data.seed to resume exactly",
                state["global_batch"],
                self.global_batch,
                self.epoch,
                self.step,
            )
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

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
