"""The `data` section of the configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from egmf.config import range_problems
from egmf.data.collate import TRUNCATION_POLICIES
from egmf.datasets import DEMO_DATASETS, SPECS


@dataclass
class DataConfig:
    root: str = "shards/demo"
    """Shard root (a folder, or a URL prefix webdataset can open); holds DATASET/SPLIT/manifest.json."""
    train: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in DEMO_DATASETS})
    """Datasets to train on and their mixing weights (each batch comes from one dataset)."""
    eval: list[str] = field(default_factory=lambda: list(DEMO_DATASETS))
    """Datasets to evaluate (their valid and test splits)."""
    batch_size: int = 8
    """Samples per batch on each rank (micro-batch)."""
    num_workers: int = 2
    """Data-loading worker processes per rank (0: load in the training process)."""
    seed: int = 0
    """Seed of shard resampling, interleaving and dataset mixing."""
    samples_per_epoch: int = 0
    """Training samples per epoch over all ranks; 0 means the sum of the train splits' sizes."""
    open_shards: int = 4
    """Shards each worker reads at once, interleaved at random (the sample shuffle)."""
    max_audio_frames: int = 1024
    """Longer audio sequences are truncated (see `truncation`)."""
    max_vision_frames: int = 512
    """Longer vision sequences are truncated (see `truncation`)."""
    truncation: str = "uniform"
    """'uniform': keep evenly spaced frames; 'head': keep the first frames."""
    max_bad_samples: int = 100
    """Skipped bad samples tolerated per rank before loading stops with an error."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead."""

    def problems(self) -> list[str]:
        """Every invalid value, one line each (empty when valid)."""
        found = []
        for name in list(self.train) + list(self.eval):
            if name not in SPECS:
                found.append(f"data: unknown dataset {name!r} (known: {', '.join(SPECS)})")
        if not self.train:
            found.append("data.train: name at least one dataset to train on")
        found += [f"data.train.{name} must be > 0, got {w!r}" for name, w in self.train.items() if not w > 0]
        at_least_one = ("batch_size", "open_shards", "max_audio_frames", "max_vision_frames", "prefetch_batches")
        found += range_problems("data", self, at_least_one, low=1)
        found += range_problems("data", self, ("num_workers", "samples_per_epoch", "max_bad_samples"), low=0)
        if self.truncation not in TRUNCATION_POLICIES:
            found.append(f"data.truncation: {self.truncation!r} is not one of {', '.join(TRUNCATION_POLICIES)}")
        return found
