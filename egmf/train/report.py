"""`egmf-report`: the mean ± std over seeds of the best-validation models' test metrics, in the field's form.

    egmf-report runs/mosei                        # a sweep folder (egmf-sweep's train.output_dir)
    egmf-report PARENT_RUN_ID --tracking-uri sqlite:///runs/mosei/mlflow.db

Each seed contributes its reported numbers: the test metrics of the model
chosen on validation (final/test/DATASET/MODE/METRIC). Unfinished seeds are
left out and the table says how many seeds it holds. Accuracies and F1 are
shown in percent, MAE and Corr as they are; the std is the sample standard
deviation (n - 1). Where the EGMF paper publishes a number, it stands beside
ours. The table goes to report.md and report.csv (in the sweep folder, or
--out) and, when the sweep has a parent MLflow run, to that run as artifacts
and as report/DATASET/METRIC/{mean,std} metrics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys

from egmf.atomic import write_atomically
from egmf.metrics import metric_names

SWEEP_RECORD = "sweep.json"
"""A sweep folder's record (egmf/train/sweep.py): the parent run the report goes to."""
SEED_PREFIX = "seed_"
"""Seed S of a sweep trains in ROOT/seed_S."""
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"

DISPLAY = {
    "has0_acc2": "Has0 Acc-2",
    "has0_f1": "Has0 F1",
    "non0_acc2": "Non0 Acc-2",
    "non0_f1": "Non0 F1",
    "acc2": "Acc-2",
    "acc3": "Acc-3",
    "acc5": "Acc-5",
    "acc7": "Acc-7",
    "f1": "F1",
    "mae": "MAE",
    "corr": "Corr",
    "wf1": "weighted F1",
    "acc": "Acc",
}
UNSCALED = ("mae", "corr")
"""Shown as they are; every other metric is a share, shown in percent as the field does."""

PAPER = {("meld", "wf1"): 65.57, ("cherma", "wf1"): 73.90, ("mosei", "non0_f1"): 87.09, ("sims2", "acc2"): 82.57}
"""The EGMF paper's published test numbers (arXiv 2601.07565). Its MOSEI figure is an "F1" without saying
Has0 or Non0; it stands beside Non0 F1, the form most LLM-based work reports."""


def seed_results_from_folder(root: str) -> dict[str, dict]:
    """{seed name: final_metrics.json} of every finished seed under a sweep folder."""
    results = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "final_metrics.json")
        if name.startswith(SEED_PREFIX) and os.path.isfile(path):
            with open(path) as f:
                results[name] = json.load(f)
    return results


def seed_results_from_mlflow(parent_run_id: str, tracking_uri: str) -> dict[str, dict]:
    """The same from the finished child runs of a parent run."""
    from mlflow.tracking import MlflowClient

    from egmf.tracking import PARENT_TAG

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    results = {}
    for child in children:
        reported = {k: v for k, v in child.data.metrics.items() if k.startswith("final/")}
        if child.info.status == "FINISHED" and reported:
            results[child.info.run_name] = {
                "reported": reported,
                "best_step": int(child.data.metrics.get("best/step", 0)),
                "selected_on": child.data.tags.get("selection", ""),
            }
    return dict(sorted(results.items()))


def summarise(results: dict[str, dict], split: str = "test", mode: str = "constrained") -> list[dict]:
    """One row per dataset and metric, in metric_names order: mean, std, seeds, the paper's number."""
    values: dict[tuple[str, str], list[float]] = {}
    for final in results.values():
        for key, value in final["reported"].items():
            _, key_split, dataset, key_mode, metric = key.split("/")
            if key_split == split and key_mode == mode and metric in DISPLAY and math.isfinite(value):
                values.setdefault((dataset, metric), []).append(value)
    rows = []
    for dataset in sorted({d for d, _ in values}):
        for metric in metric_names(dataset):
            found = values.get((dataset, metric))
            if not found:
                continue
            scale = 1.0 if metric in UNSCALED else 100.0
            rows.append(
                {
                    "dataset": dataset,
                    "metric": DISPLAY[metric],
                    "mean": scale * statistics.fmean(found),
                    "std": scale * statistics.stdev(found) if len(found) > 1 else 0.0,
                    "seeds": len(found),
                    "paper": PAPER.get((dataset, metric)),
                    "key": metric,
                }
            )
    return rows


def markdown(rows: list[dict], results: dict[str, dict], split: str, mode: str) -> str:
    lines = [
        f"Test metrics of the best-validation model, mean ± std over {len(results)} seed(s) ({split} split, "
        f"{mode} decoding; accuracies and F1 in %).",
        "",
        "| dataset | metric | ours | seeds | EGMF paper |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        paper = f"{row['paper']:.2f}" if row["paper"] is not None else ""
        ours = f"{row['mean']:.2f} ± {row['std']:.2f}"
        lines.append(f"| {row['dataset']} | {row['metric']} | {ours} | {row['seeds']} | {paper} |")
    lines += ["", "| seed | chosen step | selected on |", "|---|---|---|"]
    lines += [f"| {name} | {final['best_step']} | {final['selected_on']} |" for name, final in results.items()]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["dataset", "metric", "mean", "std", "seeds", "paper"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def load_results(source: str, tracking_uri: str = "") -> tuple[dict[str, dict], str, str]:
    """(seed results, parent run id, its tracking URI) of a sweep folder or of a parent run id; ValueError when
    there is nothing to report."""
    if os.path.isdir(source):
        results = seed_results_from_folder(source)
        record = os.path.join(source, SWEEP_RECORD)
        sweep = {}
        if os.path.isfile(record):
            with open(record) as f:
                sweep = json.load(f)
        parent_run_id, tracking_uri = sweep.get("parent_run_id", ""), sweep.get("tracking_uri", "")
    else:
        parent_run_id, tracking_uri = source, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not tracking_uri:
            raise ValueError(f"{source} is no folder; for a run id give --tracking-uri (or $MLFLOW_TRACKING_URI)")
        results = seed_results_from_mlflow(parent_run_id, tracking_uri)
    if not results:
        raise ValueError(f"no finished seed in {source}: a seed is finished when its final_metrics.json exists")
    return results, parent_run_id, tracking_uri


def write_report(
    source: str, out_dir: str | None = None, tracking_uri: str = "", split: str = "test", mode: str = "constrained"
) -> str:
    """Write report.md and report.csv for a sweep folder or a parent run id (to out_dir, else the folder, else
    .) and log them to the parent run; returns the Markdown. ValueError when no seed is finished."""
    results, parent_run_id, tracking_uri = load_results(source, tracking_uri)
    out_dir = out_dir or (source if os.path.isdir(source) else ".")
    rows = summarise(results, split, mode)
    text = markdown(rows, results, split, mode)
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, REPORT_CSV), csv_text(rows).encode("utf-8"))
    write_atomically(os.path.join(out_dir, REPORT_MD), text.encode("utf-8"))
    if parent_run_id:
        log_to_parent(parent_run_id, tracking_uri, rows, len(results), out_dir)
    return text


def log_to_parent(run_id: str, tracking_uri: str, rows: list[dict], seeds: int, out_dir: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for row in rows:
        client.log_metric(run_id, f"report/{row['dataset']}/{row['key']}/mean", row["mean"])
        client.log_metric(run_id, f"report/{row['dataset']}/{row['key']}/std", row["std"])
    client.log_metric(run_id, "report/seeds", seeds)
    for name in (REPORT_MD, REPORT_CSV):
        client.log_artifact(run_id, os.path.join(out_dir, name), "report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egmf-report", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("source", help="a sweep folder, or a parent MLflow run id")
    parser.add_argument(
        "--tracking-uri", default="", help="the MLflow store of a run id (default: $MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--out", help="folder for report.md and report.csv (default: the sweep folder, or .)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--mode", default="constrained", choices=("constrained", "generate"))
    args = parser.parse_args(argv)
    try:
        print(write_report(args.source, args.out, args.tracking_uri, args.split, args.mode), end="")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
