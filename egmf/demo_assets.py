"""The embedded default job's assets: the synthetic demo shards and the tiny LLM, built where missing.

    if demo_assets_missing(root, splits, llm_path):
        build_demo_assets(root, splits, llm_path)      # one process only (rank 0 after the process group)

A run whose datasets are all demo sets (egmf.datasets.DEMO_DATASETS) builds
what it lacks instead of failing, so `make train` and `egmf-train` with no
arguments work on a fresh clone. A run on any other dataset never builds
anything: its missing model or shards are errors.
"""

from __future__ import annotations

import os

from egmf.datasets import DEMO_DATASETS
from egmf.shards.demo import build_demo
from egmf.shards.manifest import MANIFEST_NAME

DEMO_SIZES = {"train": 512, "valid": 128, "test": 128}


def is_demo(datasets: list[str]) -> bool:
    return all(name in DEMO_DATASETS for name in datasets)


def shards_missing(root: str, splits: list[tuple[str, str]]) -> bool:
    """Whether any (dataset, split) has no manifest under `root`."""
    return any(not os.path.isfile(os.path.join(root, d, s, MANIFEST_NAME)) for d, s in splits)


def demo_assets_missing(root: str, splits: list[tuple[str, str]], llm_path: str) -> bool:
    """True when a demo-only run lacks shards or its model: they will be built, so they are not errors."""
    model_missing = not os.path.isfile(os.path.join(llm_path, "config.json"))
    return is_demo([d for d, _ in splits]) and (shards_missing(root, splits) or model_missing)


def build_demo_assets(root: str, splits: list[tuple[str, str]], llm_path: str) -> None:
    from egmf.model.tiny import build_tiny_llm

    if shards_missing(root, splits):
        build_demo(root, DEMO_SIZES, seed=0)
    build_tiny_llm(llm_path)
