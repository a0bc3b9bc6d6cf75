"""What several test modules need to start a short training run and read its MLflow store."""

from __future__ import annotations

import os

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
