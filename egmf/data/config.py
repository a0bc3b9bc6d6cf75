"""The `data` section of the configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from egmf.config import range_problems
from egmf.data.collate import TRUNCATION_POLICIES
from egmf.datasets import DEMO_DATASETS, SPECS, add_spec, get_spec, is_known, spec_from_dict
from egmf.errors import DataError
from egmf.shards.manifest import MissingManifest, load_manifest


@dataclass
class DataConfig:
    root: str = "shards/demo"
    """Shard root (a folder, or a URL prefix webdataset can open); holds DATASET/SPLIT/manifest.json."""
    train: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in DEMO_DATASETS})
    """Datasets to train on and their weights: each one's share of an epoch's steps (a step's global batch comes
    from one dataset)."""
    eval: list[str] = field(default_factory=lambda: list(DEMO_DATASETS))
    """Datasets to evaluate (their valid and test splits)."""
    batch_size: int = 8
    """Samples per batch on each rank (micro-batch)."""
    num_workers: int = 2
    """Data-loading worker processes per rank (0: load in the training process)."""
    seed: int = 0
    """Seed of the training sample order: shard permutations, interleaving and each epoch's dataset order."""
    samples_per_epoch: int = 0
    """Training samples per epoch over all ranks; 0 means the sum of the train splits' sizes."""
    open_shards: int = 4
    """Shards of each dataset's sample order open at once, read in a random interleaving (the sample shuffle)."""
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
    specs: dict[str, dict] = field(default_factory=dict)
    """Datasets that are not built in: name -> spec (lang, task, labels or label_range, label_words; docs/data.md).
    Read from the shards' manifests when not given; saved with the run, so its model knows them without shards."""

    def problems(self) -> list[str]:
        """Every invalid value, one line each (empty when valid). Makes the datasets of `specs` known first."""
        found = self.resolve_specs()
        if not self.train:
            found.append("data.train: name at least one dataset to train on")
        found += [f"data.train.{name} must be > 0, got {w!r}" for name, w in self.train.items() if not w > 0]
        at_least_one = ("batch_size", "open_shards", "max_audio_frames", "max_vision_frames", "prefetch_batches")
        found += range_problems("data", self, at_least_one, low=1)
        found += range_problems("data", self, ("num_workers", "samples_per_epoch", "max_bad_samples"), low=0)
        if self.truncation not in TRUNCATION_POLICIES:
            found.append(f"data.truncation: {self.truncation!r} is not one of {', '.join(TRUNCATION_POLICIES)}")
        return found

    def resolve_specs(self) -> list[str]:
        """Make every dataset of `specs`, and every named dataset that is not built in, known to this process
        (egmf.datasets.add_spec): from `specs`, else from the dataset's manifest under `root`, which is then
        recorded in `specs`. One line per dataset that stays unknown or contradicts another spec."""
        found = []
        for name, table in self.specs.items():
            try:
                add_spec(spec_from_dict({**table, "name": name}, f"data.specs.{name}"))
            except DataError as exc:
                found.append(str(exc))
        for name in dict.fromkeys([*self.train, *self.eval]):
            if name in SPECS or name in self.specs:
                continue
            try:
                spec = spec_in_manifests(self.root, name)
                add_spec(spec)
            except DataError as exc:
                if not is_known(name):  # known all the same: made known earlier in this process
                    found.append(f"data: unknown dataset {name!r} ({exc})")
                    continue
                spec = get_spec(name)
            self.specs[name] = {key: value for key, value in spec.to_dict().items() if key != "name"}
        return found


def spec_in_manifests(root: str, dataset: str):
    """The spec the builder stored in the dataset's manifests under `root` (every split must agree), or a DataError
    that says how to describe the dataset."""
    specs = []
    for split in ("train", "valid", "test"):
        try:
            specs.append(load_manifest(root, dataset, split).spec())
        except MissingManifest:
            continue
    if not specs:
        raise DataError(
            f"not built in, not in data.specs, and no manifest under {root}/{dataset}/ to read its spec from; build "
            "its shards with `egmf-shards build --format jsonl --spec FILE` (docs/data.md) or fix the name"
        )
    differing = {str(s.to_dict()) for s in specs}
    if len(differing) > 1:
        raise DataError(
            f"its splits under {root}/{dataset}/ were built with different specs ({'; '.join(sorted(differing))}); "
            "rebuild them with one spec"
        )
    return specs[0]
