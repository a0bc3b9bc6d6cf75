"""The embedded default job's assets: the synthetic demo shards and the tiny LLM, built where missing.

    if demo_assets_missing(root, splits, llm_path):
        build_demo_assets(root, splits, llm_path)      # one process only (rank 0 after the process group)

A run whose datasets are all demo sets (egmf.datasets.ALL_DEMO_DATASETS) builds
its demo sets (all of them again when one is missing: the same seed gives the
same samples) and the model at the demo recipe's own locations (shards/demo,
runs/tiny-llm) instead of failing, so `make train` and `egmf-train` with no arguments work on
a fresh clone; a model or shard root given elsewhere must exist (a mistyped
path is an error, never a fresh random model or new demo shards). Demo shards written by an older design of the
demo (their manifest's `source.design`) count as missing and are rebuilt, but
nothing is built over a demo set's split that was built from other input
(egmf-shards build --format jsonl). A run on any other dataset never builds
anything: its missing model or shards are errors.
"""

from __future__ import annotations

import json
import os

from egmf.datasets import ALL_DEMO_DATASETS
from egmf.shards.demo import DEMO_DESIGN, build_demo
from egmf.shards.manifest import MANIFEST_NAME

DEMO_SIZES = {"train": 2048, "valid": 128, "test": 128}
DEMO_SET_SIZES = {"demo_key_en": {"train": 16384}}
"""The look-up set's train split is larger: from 2048 or 4096 clips the model fits the training clips before it
learns the look-up (docs/benchmarks.md)."""
DEMO_ROOT = "shards/demo"
"""The demo recipe's shard root and model folder (relative to where the run starts): the only places a run builds
demo assets."""
DEMO_LLM = "runs/tiny-llm"


def demo_split_size(dataset: str, split: str) -> int:
    """Samples in a demo set's split as a run builds it."""
    return DEMO_SET_SIZES.get(dataset, {}).get(split, DEMO_SIZES[split])


def is_demo(datasets: list[str]) -> bool:
    return all(name in ALL_DEMO_DATASETS for name in datasets)


def shards_missing(root: str, splits: list[tuple[str, str]]) -> bool:
    """Whether any (dataset, split) has no manifest under `root`, or a demo set's is of an older demo design. Never
    when one of them was built from other input (egmf-shards build): the demo build would overwrite it."""
    states = [split_state(os.path.join(root, d, s, MANIFEST_NAME), d in ALL_DEMO_DATASETS) for d, s in splits]
    return "built from other input" not in states and any(state != "current" for state in states)


def split_state(manifest_path: str, demo: bool) -> str:
    """'missing', 'older demo design', 'built from other input' or 'current'."""
    if not os.path.isfile(manifest_path):
        return "missing"
    if not demo:
        return "current"
    with open(manifest_path) as f:
        source = json.load(f).get("source", {})
    if source.get("format") != "demo":
        return "built from other input"
    return "older demo design" if source.get("design") != DEMO_DESIGN else "current"


def demo_assets_missing(root: str, splits: list[tuple[str, str]], llm_path: str) -> bool:
    """True when a demo-only run lacks shards or its model at the demo recipe's own locations: they will be built,
    so they are not errors. Anywhere else a missing model or shard folder is most likely a typo, and an error."""
    model_missing = not os.path.isfile(os.path.join(llm_path, "config.json"))
    shards_to_build = os.path.normpath(root) == DEMO_ROOT and shards_missing(root, splits)
    model_to_build = os.path.normpath(llm_path) == DEMO_LLM and model_missing
    return is_demo([d for d, _ in splits]) and (shards_to_build or model_to_build)


def build_demo_assets(root: str, splits: list[tuple[str, str]], llm_path: str) -> None:
    from egmf.model.tiny import build_tiny_llm

    if shards_missing(root, splits):
        datasets = tuple(dict.fromkeys(d for d, _ in splits))
        build_demo(root, DEMO_SIZES, seed=0, datasets=datasets, set_sizes=DEMO_SET_SIZES)
    build_tiny_llm(llm_path)
