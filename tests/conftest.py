"""Shared fixtures: public-layout input files, demo shards, small custom splits; what a test needs installed.

Test tiers (markers, registered in pyproject.toml): `slow` (multi-process DeepSpeed runs, learning runs,
benchmarks), `cluster` (a real Slurm cluster), `browser` (the MLflow UI in Chromium), `gpu` (CUDA). `make
test-fast` runs every test without these markers; `make test` runs them all.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from egmf.datasets import get_spec
from egmf.shards.demo import build_demo, demo_patterns, make_record
from egmf.shards.writer import ShardLimits, write_split


def require(available: bool, what: str) -> None:
    """Skip a test whose system requirement is missing, saying what to install; under CI (CI=true) fail instead:
    .ci/run installs everything, so a missing piece there is a broken install step, not a reason to skip."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what}")
    pytest.skip(what)


def require_binaries(*names: str, install: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    require(not missing, f"needs {', '.join(missing)} on PATH ({install}; .ci/run installs it)")


MOSEI_DIMS = (74, 35)
MELD_DIMS = (64, 64)


def mmsa_split(rng: np.random.Generator, n: int, prefix: str, padded=(50, 20), dims=MOSEI_DIMS) -> dict:
    """One split in the MMSA layout, with -inf in audio and NaN in vision as real files have."""
    audio = rng.standard_normal((n, padded[0], dims[0])).astype(np.float32)
    vision = rng.standard_normal((n, padded[1], dims[1])).astype(np.float32)
    audio_lengths = rng.integers(5, padded[0] + 1, size=n)
    vision_lengths = rng.integers(3, padded[1] + 1, size=n)
    for i in range(n):  # zero padding after each length, as the release has
        audio[i, audio_lengths[i] :] = 0
        vision[i, vision_lengths[i] :] = 0
    audio[0, 0, :3] = -np.inf
    vision[0, 1, :2] = np.nan
    audio[1, 0, 0] = np.inf
    return {
        "raw_text": np.array([f"utterance {prefix} {i}" for i in range(n)], dtype=object),
        "audio": audio,
        "vision": vision,
        "id": np.array([f"vid{i // 3}_{i % 3}" for i in range(n)], dtype=object),
        "regression_labels": np.round(rng.uniform(-3, 3, size=n), 3).astype(np.float32),
        "audio_lengths": audio_lengths,
        "vision_lengths": vision_lengths,
        "text_bert": np.zeros((n, 3, 10), dtype=np.float32),  # present in real files, ignored
        "classification_labels": np.zeros(n, dtype=np.float32),
    }


def write_mmsa(path: str, sizes=(12, 5, 6), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {split: mmsa_split(rng, n, split) for split, n in zip(("train", "valid", "test"), sizes, strict=True)}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


def mse_adapter_items(rng: np.random.Generator, n: int, labels: list[str], dims=MELD_DIMS) -> list[dict]:
    items = []
    for i in range(n):
        audio_len, video_len = int(rng.integers(4, 30)), int(rng.integers(2, 10))
        audio = rng.standard_normal((30, dims[0])).astype(np.float32)
        video = rng.standard_normal((10, dims[1])).astype(np.float32)
        if i == 0:
            audio[0, :4] = -np.inf
            video[0, :2] = np.nan
        items.append(
            {
                "features": {
                    "text": f"line {i}",
                    "audio": audio,
                    "video": video,
                    "audio_len": audio_len,
                    "video_len": video_len,
                },
                "label": labels[i % len(labels)],
            }
        )
    return items


def write_mse_adapter(folder: str, dataset: str, labels: list[str], sizes=(14, 4, 5), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    data = {}
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        data[split] = mse_adapter_items(rng, n, labels)
        with open(os.path.join(folder, f"{dataset}_{split}.pkl"), "wb") as f:
            pickle.dump(data[split], f)
    return data


def write_demo_split(root: str, dataset: str, split: str, num_samples: int, shard_samples: int, seed: int = 0):
    """A split of a demo dataset with chosen size and shard size (last shard shorter)."""
    rng = np.random.default_rng([seed, num_samples])
    patterns = demo_patterns(dataset, seed)
    records = [make_record(rng, dataset, i, split, patterns) for i in range(num_samples)]
    return write_split(
        records, get_spec(dataset), split, root, ShardLimits(max_samples=shard_samples), source={"format": "test"}
    )


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """Small demo shards shared by the loader tests (read-only)."""
    root = str(tmp_path_factory.mktemp("demo"))
    build_demo(root, {"train": 96, "valid": 40, "test": 40}, seed=0, shard_samples=16)
    return root


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A tiny real Llama + SentencePiece tokenizer directory (read-only)."""
    from egmf.model.tiny import build_tiny_llm

    return build_tiny_llm(str(tmp_path_factory.mktemp("tiny-llm")))


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> str:
    """Demo shards sized for trainer runs: 8 train shards per set (enough for 2 ranks x 2 workers)."""
    root = str(tmp_path_factory.mktemp("train-shards"))
    build_demo(root, {"train": 256, "valid": 24, "test": 24}, seed=0, shard_samples=32)
    return root


@pytest.fixture(scope="session")
def trained_best(train_shards, tiny_llm, tmp_path_factory) -> str:
    """best/ of a 4-step run on the test shards (read-only). In its own process: DeepSpeed caches its process
    groups per process, so a second in-process run (test_train_smoke.py) would find this one's, destroyed."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    args = [f"--data.root={train_shards}", f"--llm.path={tiny_llm}", f"--train.output_dir={out}", "--train.steps=4"]
    args += ["--eval.every=0", "--data.batch_size=4", "--data.num_workers=0", "--optim.warmup_steps=1"]
    args += ["--eval.modes=['constrained']", "--eval.batch_size=24", "--mlflow.system_metrics=false"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "launch/train.py", *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    return os.path.join(out, "best")


def split_as_jsonl(root: str, dataset: str, split: str, out_dir: str, labels: bool = True) -> str:
    """A shard split written back in the builder's JSONL format (audio as .npy files beside it, vision inline),
    with or without its labels; returns the .jsonl path."""
    from egmf.shards.format import decode_sample
    from egmf.shards.manifest import load_manifest

    manifest = load_manifest(root, dataset, split)
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    lines = []
    for index in range(len(manifest.shards)):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(manifest.shard_url(index)) as tar:
            for info in tar:
                key, suffix = info.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
        for members in samples.values():
            sample = decode_sample(members)
            np.save(os.path.join(out_dir, "audio", f"{sample.id}.npy"), sample.audio)
            row = {"id": sample.id, "text": sample.meta["text"], "audio": f"audio/{sample.id}.npy"}
            row["vision"] = sample.vision.astype(np.float64).tolist()
            if labels:
                row["label"] = sample.meta["label"]
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = os.path.join(out_dir, f"{dataset}_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path
