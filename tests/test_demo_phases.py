"""The two-phase demo run: launch/recipes/demo-first.toml (the look-up set alone, uniform gate, the score read) and
demo-phased.toml (all five demo sets, from the first phase's model). The second must accept what the first saves."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from run_helpers import REPO
from safetensors.torch import load_file

from egmf.datasets import ALL_DEMO_DATASETS
from egmf.shards.demo import build_demo
from egmf.train.config import load_config
from egmf.train.trainer import build_model

FIRST = os.path.join(REPO, "launch", "recipes", "demo-first.toml")
PHASED = os.path.join(REPO, "launch", "recipes", "demo-phased.toml")


def test_the_second_phase_starts_from_the_first_and_differs_only_where_it_must():
    first, phased = load_config(FIRST), load_config(PHASED)
    assert phased.train.init_from == os.path.join(first.train.output_dir, "best")
    assert phased.train.output_dir != first.train.output_dir and not first.train.init_from
    assert set(first.data.train) < set(phased.data.train) == set(ALL_DEMO_DATASETS)
    assert first.fusion.gating == "uniform" and phased.fusion.gating == "dynamic"
    assert phased.optim.gate_lr_ratio < 1 == first.optim.gate_lr_ratio
    assert first.fusion.score_read_coef > 0 == phased.fusion.score_read_coef  # the read teaches the first phase only
    # Every other fusion and LoRA setting equal: the second phase would refuse the first's weights otherwise.
    same = dataclasses.replace(first.fusion, gating="dynamic", score_read_coef=0.0)
    assert same == phased.fusion and first.lora == phased.lora


@pytest.fixture(scope="module")
def five_sets(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("five-sets"))
    build_demo(root, {"train": 64, "valid": 16, "test": 16}, seed=0, shard_samples=16, datasets=ALL_DEMO_DATASETS)
    return root


@pytest.mark.slow
def test_the_second_phase_loads_the_first_phases_model_with_its_gate_still_uniform(five_sets, tiny_llm, tmp_path):
    out = str(tmp_path / "first")
    args = ["--config", FIRST, f"--data.root={five_sets}", f"--llm.path={tiny_llm}", f"--train.output_dir={out}"]
    args += ["--train.steps=2", "--optim.warmup_steps=1", "--data.batch_size=4", "--data.num_workers=0"]
    args += ["--eval.every=0", "--checkpoint.every=0", "--eval.modes=['constrained']", "--mlflow.system_metrics=false"]
    done = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]

    best = os.path.join(out, "best")
    cfg = load_config(PHASED, [f"--data.root={five_sets}", f"--llm.path={tiny_llm}", f"--train.init_from={best}"])
    model = build_model(cfg, torch.device("cpu"))
    saved, own = load_file(os.path.join(best, "fusion.safetensors")), model.fusion.state_dict()
    shared = [k for k in saved if not k.startswith(("gate.usage", "score_read."))]
    assert shared and all(torch.equal(own[k], saved[k]) for k in shared)
    assert "score_read.weight" in saved and "score_read.weight" not in own  # trained in the first phase, left out
    assert any(k.startswith("audio_front.demo_key_en.") for k in shared)  # the look-up set's own front end, trained
    last = own["gate.score.2.weight"]  # never trained under the uniform gate: the second phase's gate starts uniform
    assert torch.count_nonzero(last) == 0 and torch.count_nonzero(own["gate.score.2.bias"]) == 0


def test_make_train_runs_the_first_phase_then_the_second_and_serves_the_seconds_store():
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    target = makefile.split("\ntrain:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in target.splitlines()[1:]]
    configs = [c.split("--config ", 1)[1].split()[0] for c in commands]
    assert configs == [os.path.relpath(FIRST, REPO), os.path.relpath(PHASED, REPO)]
    assert all("--deepspeed ds_configs/zero2.json" in c for c in commands)
    store = next(line for line in makefile.splitlines() if line.startswith("MLFLOW_STORE ?="))
    assert store.split("?=")[1].strip() == os.path.join(load_config(PHASED).train.output_dir, "mlflow.db")
