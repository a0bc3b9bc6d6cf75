"""egmf-predict on a trained model's best/: one row per sample with class probabilities, score spreads and gates,
the same predictions egmf-evaluate scores, JSONL or CSV, each sample once over ranks; bad inputs are exit 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import split_as_jsonl
from run_helpers import REPO

from egmf.distributed import free_port
from egmf.shards import cli as shards_cli
from egmf.shards.manifest import load_manifest
from egmf.train import evaluate_main, predict_main

DATASETS = ("demo_cls_en", "demo_reg_en")

pytestmark = pytest.mark.slow  # a trained model (a 4-step run in its own process) and decoding


@pytest.fixture
def best(trained_best: str) -> str:
    return trained_best


def predict(best: str, shards: str, out: str, *extra: str) -> int:
    return predict_main.main(
        ["--model", best, "--data", shards, "--out", out, "--datasets", ",".join(DATASETS), *extra]
    )


def test_rows_carry_probabilities_scores_and_gates_and_match_evaluate(best, train_shards, tmp_path):
    out = str(tmp_path / "predictions.jsonl")
    assert predict(best, train_shards, out) == 0
    rows = [json.loads(line) for line in open(out)]
    for dataset in DATASETS:
        ids = [r["id"] for r in rows if r["dataset"] == dataset]
        assert len(ids) == len(set(ids)) == load_manifest(train_shards, dataset, "test").num_samples
    for row in rows:
        assert abs(sum(row["gate"].values()) - 1) < 1e-5 and set(row["gate"]) == {"local", "semantic", "global"}
        assert "label" in row and row["answer"]
        if row["dataset"] == "demo_cls_en":
            probabilities = row["probabilities"]
            assert abs(sum(probabilities.values()) - 1) < 1e-5 and len(probabilities) == 4
            assert row["prediction"] == max(probabilities, key=probabilities.get)
        else:
            assert row["score"] == row["prediction"] and -3 <= row["score"] <= 3 and row["spread"] >= 0
    # egmf-evaluate on the same model, split and mode scores exactly these predictions
    assert evaluated_predictions(best, train_shards, tmp_path) == {
        (r["dataset"], r["id"]): r["prediction"] for r in rows
    }


def evaluated_predictions(best: str, shards: str, tmp_path) -> dict:
    """{(dataset, id): prediction} that egmf-evaluate makes on the labeled test splits (constrained)."""
    evaluated = tmp_path / "eval"
    code = evaluate_main.main(
        ["--checkpoint", best, "--splits", "test", "--modes", "constrained", "--out", str(evaluated)]
        + ["--datasets", ",".join(DATASETS), "--shards", shards]
    )
    assert code == 0
    return {(r["dataset"], r["id"]): r["prediction"] for r in map(json.loads, open(evaluated / "test.jsonl"))}


def test_csv_flattens_the_same_rows(best, train_shards, tmp_path):
    out = str(tmp_path / "predictions.csv")
    assert predict(best, train_shards, out, "--mode", "generate") == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"id", "dataset", "answer", "prediction", "score", "label", "gate_local", "gate_global"} <= columns
    assert not any(c.startswith("p_") for c in columns)  # generate mode has no answer distribution
    assert len(rows) == sum(load_manifest(train_shards, d, "test").num_samples for d in DATASETS)


def test_bad_requests_fail_before_decoding(best, train_shards, tmp_path, capsys):
    assert predict(best, train_shards, str(tmp_path / "out.txt")) == 2
    assert "must end in .jsonl or .csv" in capsys.readouterr().err
    args = ["--model", best, "--data", train_shards, "--out", str(tmp_path / "p.jsonl"), "--datasets", "mosei"]
    assert predict_main.main(args) == 2
    assert "the model was not trained on mosei" in capsys.readouterr().err
    assert predict_main.main(["--model", best, "--data", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "no test split of a dataset the model knows" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.jsonl")


def test_each_sample_is_predicted_once_over_two_ranks(best, train_shards, tmp_path):
    out = str(tmp_path / "two_ranks.jsonl")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += ["launch/predict.py", "--model", best, "--data", train_shards, "--out", out, "--batch-size", "5"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = [json.loads(line) for line in open(out)]
    for dataset in ("demo_cls_en", "demo_cls_zh", "demo_reg_en", "demo_reg_zh"):  # every dataset the model knows
        ids = [r["id"] for r in rows if r["dataset"] == dataset]
        assert len(ids) == len(set(ids)) == load_manifest(train_shards, dataset, "test").num_samples, dataset


def test_an_unlabeled_jsonl_split_is_predicted_as_egmf_evaluate_scores_the_labeled_one(best, train_shards, tmp_path):
    """The demo test splits written as JSONL without labels, built with egmf-shards (and, for one set, given to
    egmf-predict as the .jsonl itself): one row per sample, no label, the predictions egmf-evaluate makes on the
    labeled splits."""
    root = str(tmp_path / "unlabeled")
    for dataset in DATASETS:
        source = split_as_jsonl(train_shards, dataset, "test", str(tmp_path / dataset), labels=False)
        build = ["build", "--format", "jsonl", "--dataset", dataset, "--split", "test", "--input", source]
        assert shards_cli.main([*build, "--out", root]) == 0
        assert not load_manifest(root, dataset, "test").labeled
    out = str(tmp_path / "predictions.jsonl")
    assert predict(best, root, out) == 0
    rows = [json.loads(line) for line in open(out)]
    for row in rows:
        assert "label" not in row and abs(sum(row["gate"].values()) - 1) < 1e-5
        if row["dataset"] == "demo_cls_en":
            assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    assert {(r["dataset"], r["id"]): r["prediction"] for r in rows} == evaluated_predictions(
        best, train_shards, tmp_path
    )
    direct = str(tmp_path / "direct.jsonl")
    source = os.path.join(tmp_path, "demo_cls_en", "demo_cls_en_test.jsonl")
    args = ["--model", best, "--data", source, "--datasets", "demo_cls_en", "--out", direct]
    assert predict_main.main(args) == 0
    assert [json.loads(line) for line in open(direct)] == [r for r in rows if r["dataset"] == "demo_cls_en"]
