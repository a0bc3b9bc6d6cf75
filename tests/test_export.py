"""egmf-export: a package that loads from itself and its base model alone (in a fresh process, after the run's
folder is gone) and predicts what best/ predicts; its adapter loads with peft's Auto class; a model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from run_helpers import REPO

from egmf.model.egmf_model import EGMFModel
from egmf.train import export_main, predict_main
from egmf.train.checkpoint import saved_weights
from egmf.train.config import config_from_table
from egmf.train.saved_model import load_saved_model


@pytest.mark.slow
def test_a_package_stands_alone_and_predicts_what_best_predicts(trained_best, train_shards, tiny_llm, tmp_path):
    run_copy = shutil.copytree(trained_best, tmp_path / "run" / "best")
    package = str(tmp_path / "package")
    assert export_main.main(["--model", str(run_copy), "--out", package]) == 0
    shutil.rmtree(tmp_path / "run")  # nothing of the run is left
    names = sorted(os.listdir(package))
    assert names == sorted(
        ["README.md", "adapter", "config.json", "egmf_package.json", "fusion.json", "fusion.safetensors", "tokenizer"]
    )
    record = json.load(open(os.path.join(package, "egmf_package.json")))
    assert record["base_model"] == os.path.abspath(tiny_llm) and len(record["datasets"]) == 4
    assert record["chosen"]["step"] == 4 and record["chosen"]["selected_on"].startswith("valid (constrained)")
    card = open(os.path.join(package, "README.md")).read()
    assert "Chosen at step 4 on valid (constrained)" in card and "EGMFModel.from_pretrained" in card

    # the same model as best/'s: every weight, including the standardisation statistics
    from_package = EGMFModel.from_pretrained(package)
    table, weights = saved_weights(trained_best)
    from_best = load_saved_model(config_from_table(table), weights, torch.device("cpu"))
    theirs = dict(from_best.named_parameters()) | dict(from_best.named_buffers())
    ours = dict(from_package.named_parameters()) | dict(from_package.named_buffers())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    # egmf-predict on the package, in a fresh process, equals egmf-predict on best/
    expected = str(tmp_path / "best.jsonl")
    assert predict_main.main(["--model", trained_best, "--data", train_shards, "--out", expected]) == 0
    got = str(tmp_path / "package.jsonl")
    command = [sys.executable, "launch/predict.py", "--model", package, "--data", train_shards, "--out", got]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert open(got).read() == open(expected).read()


@pytest.mark.slow
def test_the_adapter_loads_with_peft_auto_class(trained_best, tmp_path):
    from peft import AutoPeftModelForCausalLM

    package = str(tmp_path / "package")
    assert export_main.main(["--model", trained_best, "--out", package]) == 0
    model = AutoPeftModelForCausalLM.from_pretrained(os.path.join(package, "adapter"))
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


def test_a_bad_model_folder_is_refused(tmp_path, capsys):
    assert export_main.main(["--model", str(tmp_path), "--out", str(tmp_path / "package")]) == 2
    assert "nor a package" in capsys.readouterr().err and not (tmp_path / "package").exists()


@pytest.mark.slow
def test_merged_lora_predicts_what_the_adapter_predicts(trained_best, train_shards, tmp_path, capsys):
    package = str(tmp_path / "package")
    assert export_main.main(["--model", trained_best, "--out", package, "--merge-lora"]) == 0
    assert os.path.isfile(os.path.join(package, "merged", "config.json"))
    rows = {}
    for name, extra in (("adapter", []), ("merged", ["--merged"])):
        out = str(tmp_path / f"{name}.jsonl")
        args = ["--model", package, "--data", train_shards, "--datasets", "demo_cls_en", "--out", out, *extra]
        assert predict_main.main(args) == 0
        rows[name] = [json.loads(line) for line in open(out)]
    for adapter, merged in zip(rows["adapter"], rows["merged"], strict=True):
        assert adapter["prediction"] == merged["prediction"]
        for label, p in adapter["probabilities"].items():
            assert abs(p - merged["probabilities"][label]) < 1e-4
    unmerged = str(tmp_path / "unmerged")
    assert export_main.main(["--model", trained_best, "--out", unmerged]) == 0
    args = ["--model", unmerged, "--data", train_shards, "--out", str(tmp_path / "x.jsonl"), "--merged"]
    assert predict_main.main(args) == 2
    assert "holds no merged/" in capsys.readouterr().err


PYFUNC_CHECK = """
import json, sys
import mlflow
import numpy as np
from egmf.data.tar_samples import BadSamples, decode_valid, read_shard
from egmf.shards.manifest import load_manifest

tracking_uri, shards = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(tracking_uri)
model = mlflow.pyfunc.load_model("models:/egmf-demo/1")
records = []
for dataset in ("demo_cls_en", "demo_reg_en"):
    manifest = load_manifest(shards, dataset, "test")
    bad = BadSamples(0)
    samples = [decode_valid(raw, manifest, bad) for raw in read_shard(manifest.shard_url(0), 3, bad)]
    for s in samples[:3]:
        audio = s.audio.astype(np.float32).tolist()  # nested lists
        np.save(f"{s.meta['id']}.npy", s.vision.astype(np.float32))  # a path
        records.append({"id": s.meta["id"], "dataset": dataset, "text": s.meta["text"], "audio": audio,
                        "vision": f"{s.meta['id']}.npy"})
import pandas as pd
rows = model.predict(pd.DataFrame(records)).to_dict("records")
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_the_model_is_logged_and_registered_in_mlflow_and_predicts_in_a_fresh_process(
    trained_best, train_shards, tmp_path
):
    package = str(tmp_path / "package")
    args = ["--model", trained_best, "--out", package, "--mlflow", "--register-as", "egmf-demo"]
    assert export_main.main(args) == 0
    record = json.load(open(os.path.join(os.path.dirname(trained_best), "mlflow_run.json")))
    done = subprocess.run(
        [sys.executable, "-c", PYFUNC_CHECK, record["tracking_uri"], train_shards],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    expected_file = str(tmp_path / "expected.jsonl")
    assert predict_main.main(["--model", trained_best, "--data", train_shards, "--out", expected_file]) == 0
    expected = {(r["dataset"], r["id"]): r for r in map(json.loads, open(expected_file))}
    assert len(rows) == 6
    for row in rows:
        want = expected[row["dataset"], row["id"]]
        assert row["prediction"] == want["prediction"] and row["gate"].keys() == want["gate"].keys()
        if row["dataset"] == "demo_cls_en":
            assert all(abs(p - want["probabilities"][c]) < 1e-5 for c, p in row["probabilities"].items())
