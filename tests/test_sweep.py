"""Seeds -> a results table: egmf-sweep trains one MLflow child run per seed under one parent, resumes what is
unfinished and skips what is finished; egmf-report writes mean ± std in the field's form beside the paper."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from run_helpers import REPO, store

from egmf.tracking import PARENT_TAG
from egmf.train.report import PAPER, summarise, write_report
from egmf.train.sweep import main as sweep_main

SEEDS = (1, 2, 3)


def tiny_sweep_args(shards: str, llm: str, root: str) -> list[str]:
    """A 3-seed sweep of 4-step runs on the test shards, evaluated at the end on valid (selection) and test."""
    return [
        f"--seeds={','.join(map(str, SEEDS))}",
        f"--data.root={shards}",
        f"--llm.path={llm}",
        f"--train.output_dir={root}",
        "--train.steps=4",
        "--train.log_every=2",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.eval=['demo_cls_en', 'demo_reg_en']",
        "--eval.modes=['constrained']",
        "--eval.batch_size=24",
        "--eval.every=2",
        "--optim.warmup_steps=1",
        "--mlflow.system_metrics=false",
    ]


def write_seed(root: str, seed: int, reported: dict[str, float]) -> None:
    os.makedirs(os.path.join(root, f"seed_{seed}"))
    final = {"reported": reported, "best_step": 10 * seed, "selected_on": "valid (constrained): 1 meld/wf1"}
    with open(os.path.join(root, f"seed_{seed}", "final_metrics.json"), "w") as f:
        json.dump(final, f)


def test_the_report_is_mean_and_sample_std_in_percent_beside_the_paper(tmp_path):
    root = str(tmp_path)
    wf1, mae = [0.60, 0.64, 0.68], [0.50, 0.55, 0.60]
    for seed, (w, m) in enumerate(zip(wf1, mae, strict=True), start=1):
        write_seed(
            root,
            seed,
            {
                "final/test/meld/constrained/wf1": w,
                "final/valid/meld/constrained/wf1": 0.9,
                "final/test/mosei/constrained/mae": m,
                "final/test/mosei/generate/mae": 9.0,
            },
        )
    os.makedirs(os.path.join(root, "seed_4"))  # unfinished: left out
    text = write_report(root)
    rows = {(r["dataset"], r["key"]): r for r in summarise(json_results(root))}
    assert set(rows) == {("meld", "wf1"), ("mosei", "mae")}  # test split, constrained mode only
    assert rows["meld", "wf1"]["mean"] == pytest.approx(64.0) and rows["meld", "wf1"]["seeds"] == 3
    assert rows["meld", "wf1"]["std"] == pytest.approx(100 * statistics.stdev(wf1))
    assert rows["mosei", "mae"]["mean"] == pytest.approx(0.55)  # MAE stays unscaled
    assert f"| meld | weighted F1 | 64.00 ± 4.00 | 3 | {PAPER['meld', 'wf1']:.2f} |" in text
    assert "| mosei | MAE | 0.55 ± 0.05 | 3 |  |" in text
    assert "over 3 seed(s)" in text and "| seed_2 | 20 | valid (constrained): 1 meld/wf1 |" in text
    csv_lines = open(os.path.join(root, "report.csv")).read().splitlines()
    assert csv_lines[0] == "dataset,metric,mean,std,seeds,paper" and csv_lines[1].startswith("meld,weighted F1,64.0")


def json_results(root: str) -> dict[str, dict]:
    from egmf.train.report import seed_results_from_folder

    return seed_results_from_folder(root)


def test_a_sweep_without_finished_seeds_and_a_clash_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="no finished seed"):
        write_report(str(tmp_path))
    root = str(tmp_path / "sweep")
    os.makedirs(root)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"root": root, "recipe": None, "overrides": [f"--train.output_dir={root}"], "seeds": [1, 2]}, f)
    assert sweep_main(["--seeds=1,2,3", f"--train.output_dir={root}"]) == 2
    assert "holds another sweep" in capsys.readouterr().err
    assert sweep_main(["--seeds=1,x", f"--train.output_dir={root}"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    other = str(tmp_path / "other")
    assert sweep_main(["--seeds=1", f"--train.output_dir={other}", "--train.steps=8"]) == 2  # eval every 500 steps
    assert "degenerate schedule" in capsys.readouterr().err and not os.path.exists(other)
    assert sweep_main(["--task", f"{other}:0"]) == 2  # an array task of a sweep that was never started
    assert "no sweep.json in" in capsys.readouterr().err


@pytest.mark.slow
def test_a_three_seed_sweep_gives_one_parent_three_children_and_a_table(train_shards, tiny_llm, tmp_path):
    root = str(tmp_path / "sweep")
    command = [sys.executable, "-m", "egmf.train.sweep", *tiny_sweep_args(train_shards, tiny_llm, root)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    client = store(root)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG)]
    assert len(parent) == 1 and len(runs) == 4 and parent[0].info.status == "FINISHED"
    assert {c.data.tags[PARENT_TAG] for c in children} == {parent[0].info.run_id}
    assert sorted(c.info.run_name for c in children) == ["seed_1", "seed_2", "seed_3"]
    assert {c.data.params["train.seed"] for c in children} == {"1", "2", "3"}
    tests = [c.data.metrics["final/test/demo_cls_en/constrained/wf1"] for c in children]
    assert parent[0].data.metrics["report/demo_cls_en/wf1/mean"] == pytest.approx(100 * statistics.fmean(tests))
    assert parent[0].data.metrics["report/seeds"] == 3
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")}
    assert artifacts == {"report/report.md", "report/report.csv"}
    report = open(os.path.join(root, "report.md")).read()
    assert "| demo_cls_en | weighted F1 |" in report and "| demo_reg_en | MAE |" in report

    # Run again with seed 3 unfinished: seeds 1 and 2 are skipped, seed 3 resumes (its last checkpoint is the
    # end of training: it only evaluates again), the report is written again, and no run is added.
    os.remove(os.path.join(root, "seed_3", "final_metrics.json"))
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "seed 1 finished already" in again.stdout and "seed 2 finished already" in again.stdout
    assert "training seed 3" in again.stdout and "training seed 1" not in again.stdout
    assert os.path.isfile(os.path.join(root, "seed_3", "final_metrics.json"))
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 4
