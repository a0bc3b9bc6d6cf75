"""What several test modules need: a short training run and its MLflow store, a benchmark run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16


def run_args(shards: str, llm: str, out: str, *extra: str) -> list[str]:
    """A short run on the test shards: 16 steps, logged every step, evaluated at 8, saved every 4."""
    return [
        f"--data.root={shards}",
        f"--llm.path={llm}",
        f"--train.output_dir={out}",
        f"--train.steps={STEPS}",
        "--train.log_every=1",
        "--data.batch_size=8",
        "--data.num_workers=1",
        "--eval.batch_size=24",
        "--eval.every=8",
        "--checkpoint.every=4",
        "--optim.warmup_steps=4",
        *extra,
    ]


# A quicker evaluation for runs that test something else: one dataset, one split, one mode.
SMALL_EVAL = [
    "--data.eval=['demo_cls_en']",
    "--eval.splits=['test']",
    "--eval.select_split=test",
    "--eval.modes=['constrained']",
]


def store(out: str) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def only_run(out: str, client: MlflowClient | None = None):
    client = client or store(out)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def losses(out: str, client: MlflowClient | None = None) -> dict[int, float]:
    client, run = only_run(out, client)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def run_bench(script: str, args: list[str], tmp_path, timeout: int = 600) -> tuple[str, object]:
    """(stdout, the figures of its --json file) of `python bench/SCRIPT ARGS`, which must succeed."""
    results = os.path.join(str(tmp_path), f"{script}.json")
    command = [sys.executable, os.path.join("bench", script), *args, "--json", results]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(results) as f:
        return done.stdout, json.load(f)
