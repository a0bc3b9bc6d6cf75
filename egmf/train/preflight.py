"""Checks that run before any process group starts, so a bad launch fails in seconds with every problem named.

The config's keys and values are checked by `load_config`; here: the model
directory, the shards of every dataset and split the run reads, their feature
dims, and the checkpoint to resume. The embedded default (demo shards, tiny
model) is exempt from the existence checks: its assets are built when missing.
"""

from __future__ import annotations

import os

from egmf.config import Config, ConfigError
from egmf.datasets import DEMO_DATASETS
from egmf.errors import DataError
from egmf.model.fusion import check_feature_dims
from egmf.model.llm import ModelPathError, check_model_dir
from egmf.shards.demo import build_demo
from egmf.shards.manifest import MANIFEST_NAME, load_manifest
from egmf.train.checkpoint import resolve_resume

DEMO_SIZES = {"train": 512, "valid": 128, "test": 128}


def is_demo(cfg: Config) -> bool:
    return all(name in DEMO_DATASETS for name in list(cfg.data.train) + list(cfg.data.eval))


def splits_read(cfg: Config) -> list[tuple[str, str]]:
    return [(d, "train") for d in cfg.data.train] + [(d, s) for d in cfg.data.eval for s in cfg.eval.splits]


def shards_missing(cfg: Config) -> bool:
    return any(not os.path.isfile(os.path.join(cfg.data.root, d, s, MANIFEST_NAME)) for d, s in splits_read(cfg))


def demo_assets_missing(cfg: Config) -> bool:
    return is_demo(cfg) and (shards_missing(cfg) or not os.path.isfile(os.path.join(cfg.llm.path, "config.json")))


def build_demo_assets(cfg: Config) -> None:
    """The demo shards and the tiny model, where missing (one process only: rank 0 after the process group)."""
    from egmf.model.tiny import build_tiny_llm

    if shards_missing(cfg):
        build_demo(cfg.data.root, DEMO_SIZES, seed=0)
    build_tiny_llm(cfg.llm.path)


def feature_dims(cfg: Config) -> dict[str, tuple[int, int]]:
    """(audio, vision) dims per dataset, from its train split (eval-only datasets: their first eval split)."""
    dims = {}
    for dataset, split in splits_read(cfg):
        if dataset not in dims:
            manifest = load_manifest(cfg.data.root, dataset, split)
            dims[dataset] = (manifest.audio_dim, manifest.vision_dim)
    return dims


def preflight(cfg: Config) -> None:
    """Raise ConfigError naming every problem found; demo assets that will be built are not problems."""
    problems = []
    will_build = demo_assets_missing(cfg)
    if not will_build:
        try:
            check_model_dir(cfg.llm.path)
        except ModelPathError as exc:
            problems.append(str(exc))
        try:
            manifests = [load_manifest(cfg.data.root, d, s) for d, s in splits_read(cfg)]
            check_feature_dims(feature_dims(cfg), manifests)
        except (DataError, FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
    try:
        resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("cannot start:\n  " + "\n  ".join(problems))
