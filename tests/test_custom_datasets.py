"""Datasets that are not built in, and splits without labels: a spec file, the builder's JSONL format, the spec
carried by manifests and configs, unlabeled splits that decoding reads and training refuses, and the errors that
name what is wrong and where, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import split_as_jsonl
from run_helpers import REPO

from egmf.data.config import DataConfig
from egmf.data.loader import EvalLoader
from egmf.datasets import get_spec
from egmf.errors import ConfigError
from egmf.shards import cli
from egmf.shards.manifest import load_manifest
from egmf.train import predict_main
from egmf.train.config import config_from_table, load_config
from egmf.train.evaluation import PredictionRow, score_rows
from egmf.train.preflight import preflight

SPEC = """
name = "my_clips"
lang = "en"
task = "classification"
labels = ["calm", "happy", "sad", "angry"]
aliases = { neutral = "calm", joy = "happy", sadness = "sad", anger = "angry" }
audio_dim = 16
vision_dim = 12
"""
RENAMED = {"neutral": "calm", "joy": "happy", "sadness": "sad", "anger": "angry"}


@pytest.fixture
def spec_file(tmp_path) -> str:
    path = tmp_path / "my_clips.toml"
    path.write_text(SPEC)
    return str(path)


def build(*args: str) -> int:
    return cli.main(["build", "--format", "jsonl", *args])


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_a_dataset_from_a_spec_file_round_trips_through_jsonl(demo_root, spec_file, tmp_path):
    """Paths and inline arrays in, shards out; the shards hold exactly the input, with the spec's class names."""
    source = split_as_jsonl(demo_root, "demo_cls_en", "test", str(tmp_path / "in"))
    out = str(tmp_path / "shards")
    assert build("--spec", spec_file, "--split", "test", "--input", source, "--out", out) == 0
    manifest = load_manifest(out, "my_clips", "test")
    assert manifest.labeled and manifest.labels == ["calm", "happy", "sad", "angry"]
    assert (manifest.audio_dim, manifest.vision_dim) == (16, 12)
    assert sum(manifest.label_stats.values()) == manifest.num_samples
    back = split_as_jsonl(out, "my_clips", "test", str(tmp_path / "back"))
    expected = [{**row, "label": RENAMED[row["label"]]} for row in rows(source)]
    assert sorted(rows(back), key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    assert manifest.spec().labels == ("calm", "happy", "sad", "angry")


def test_an_unlabeled_split_is_marked_and_decoding_reads_it(demo_root, tmp_path, capsys):
    source = split_as_jsonl(demo_root, "demo_cls_en", "test", str(tmp_path / "in"), labels=False)
    out = str(tmp_path / "shards")
    assert build("--dataset", "demo_cls_en", "--split", "test", "--input", source, "--out", out) == 0
    manifest = load_manifest(out, "demo_cls_en", "test")
    assert not manifest.labeled and manifest.label_stats == {}
    batches = list(EvalLoader(DataConfig(root=out, batch_size=16, num_workers=0), "demo_cls_en", "test"))
    assert sum(len(b) for b in batches) == manifest.num_samples
    assert all(label is None for b in batches for label in b.labels)
    assert cli.main(["inspect", out]) == 0 and "unlabeled split" in capsys.readouterr().out
    # egmf-evaluate's scoring counts an unlabeled split's samples and computes no metric
    row = PredictionRow("a", "demo_cls_en", "test", "constrained", None, "joy", "joy")
    assert score_rows([row]) == {"demo_cls_en": {"constrained": {"unparseable": 0, "samples": 1}}}


def write_lines(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


SAMPLE = {"id": "s1", "text": "hello there", "audio": [[0.0] * 16] * 3, "vision": [[0.0] * 12] * 2, "label": "calm"}


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        ([SAMPLE, {**SAMPLE, "id": "s2", "label": None}], [], "sample 's2' (line 2) has no label but others have"),
        ([{**SAMPLE, "lable": "calm"}], [], ":1: unknown key(s) lable"),
        ([SAMPLE, SAMPLE], [], ":2: id 's1' is already used on line 1"),
        (["{not json"], [], ":1: not valid JSON"),
        ([{**SAMPLE, "audio": "missing.npy"}], [], "audio file"),
        ([{**SAMPLE, "vision": [[0.0] * 11] * 2}], [], "vision dim is 11 but the split's is 12"),
        ([{**SAMPLE, "label": "bored"}], [], "unknown label 'bored' for my_clips"),
        ([SAMPLE], ["--lang", "en"], "not both"),
        ([SAMPLE], ["--label-map", "MISSING.json"], "--label-map MISSING.json: cannot read it"),
    ],
)
def test_bad_jsonl_input_is_named_and_nothing_is_written(spec_file, tmp_path, capsys, lines, extra, message):
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "shards"
    code = build("--spec", spec_file, "--split", "train", "--input", source, "--out", str(out), *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert not (out / "my_clips" / "train").exists()


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        ('name = "x1"\nlang = "fr"\ntask = "classification"\nlabels = ["a", "b"]', [], "lang 'fr' must be one of"),
        ('name = "x1"\nlang = "en"\ntask = "regression"', [], "label_range must be [low, high]"),
        ('name = "x1"\nlang = "en"\n[task', [], "is not valid TOML"),
        ('name = "meld"\nlang = "en"\ntask = "regression"\nlabel_range = [0, 1]', [], "is built in with another spec"),
        (None, ["--dataset", "not_known"], "--dataset not_known is not built in"),
        (None, ["--dataset", "x2", "--lang", "en", "--task", "regression", "--label-range", "1,a"], "LOW,HIGH"),
    ],
)
def test_bad_specs_are_named(tmp_path, capsys, spec, args, message):
    source = write_lines(tmp_path / "in.jsonl", [SAMPLE])
    if spec is not None:
        (tmp_path / "spec.toml").write_text(spec)
        args = ["--spec", str(tmp_path / "spec.toml"), *args]
    assert build(*args, "--split", "train", "--input", source, "--out", str(tmp_path / "shards")) == 2
    assert message in capsys.readouterr().err


def test_the_builder_names_a_folder_input_and_a_missing_split(tmp_path, capsys):
    assert build("--dataset", "demo_cls_en", "--split", "test", "--input", str(tmp_path), "--out", "x") == 2
    assert "is a folder" in capsys.readouterr().err
    assert build("--dataset", "demo_cls_en", "--input", str(tmp_path), "--out", "x") == 2
    assert "--split: name the split" in capsys.readouterr().err


def build_custom(demo_root: str, spec_file: str, tmp_path, out: str, splits=("train", "valid", "test")) -> None:
    for split in splits:
        source = split_as_jsonl(demo_root, "demo_cls_en", split, str(tmp_path / "in" / split))
        assert build("--spec", spec_file, "--split", split, "--input", source, "--out", out) == 0


def test_a_recipe_takes_a_custom_dataset_by_name_and_the_run_keeps_its_spec(demo_root, spec_file, tmp_path):
    out = str(tmp_path / "shards")
    build_custom(demo_root, spec_file, tmp_path, out)
    data = [f"--data.root={out}", "--data.train={my_clips = 1.0}", "--data.eval=['my_clips']"]
    cfg = load_config(None, data)
    assert cfg.data.specs["my_clips"]["labels"] == ["calm", "happy", "sad", "angry"]
    # a spec given in the config (as a run saves it) makes a dataset known without any shards
    spec = {"lang": "zh", "task": "regression", "label_range": [0, 4]}
    saved = config_from_table({"data": {"root": "/nowhere", "train": {"spec_only": 1.0}, "specs": {"spec_only": spec}}})
    assert get_spec("spec_only").label_range == (0.0, 4.0) and saved.data.specs == {"spec_only": spec}
    with pytest.raises(ConfigError, match=r"unknown dataset 'my_clipz' \(not built in.*--format jsonl --spec"):
        load_config(None, [f"--data.root={out}", "--data.train={my_clipz = 1.0}", "--data.eval=[]"])


def test_splits_built_with_different_specs_are_refused(tmp_path, capsys):
    out = str(tmp_path / "shards")
    source = write_lines(tmp_path / "in.jsonl", [{**SAMPLE, "label": "a"}])
    args = ["--dataset", "two_specs", "--lang", "en", "--task", "classification", "--input", source, "--out", out]
    assert build(*args, "--labels", "a,b", "--split", "train") == 0
    assert build(*args, "--labels", "a,b,c", "--split", "valid") == 2  # the builder refuses a second spec
    assert "rebuild every split" in capsys.readouterr().err and not os.path.exists(f"{out}/two_specs/valid")
    assert build(*args, "--labels", "a,b", "--split", "valid") == 0
    path = f"{out}/two_specs/valid/manifest.json"  # built by other means: the run refuses them too
    manifest = json.load(open(path))
    json.dump({**manifest, "labels": ["a", "c"]}, open(path, "w"))
    with pytest.raises(ConfigError, match="were built with different specs"):
        load_config(None, [f"--data.root={out}", "--data.train={two_specs = 1.0}", "--data.eval=[]"])


def test_training_refuses_unlabeled_splits_and_never_builds_demo_shards_over_them(demo_root, tiny_llm, tmp_path):
    root = str(tmp_path / "shards")
    shutil.copytree(demo_root, root)
    source = split_as_jsonl(demo_root, "demo_cls_en", "test", str(tmp_path / "in"), labels=False)
    assert build("--dataset", "demo_cls_en", "--split", "test", "--input", source, "--out", root) == 0
    cfg = load_config(None, [f"--data.root={root}", f"--llm.path={tiny_llm}", "--train.output_dir=" + str(tmp_path)])
    with pytest.raises(ConfigError, match=r"demo_cls_en/test has no labels .*training needs labeled"):
        preflight(cfg)
    assert not load_manifest(root, "demo_cls_en", "test").labeled  # still the user's split
    os.remove(os.path.join(root, "demo_cls_en", "valid", "manifest.json"))  # a demo split to build, beside it
    from egmf.demo_assets import shards_missing

    assert not shards_missing(root, [("demo_cls_en", "valid"), ("demo_cls_en", "test")])


@pytest.mark.slow  # a 4-step training run and decoding, each in its own process
def test_a_dataset_defined_only_by_a_spec_file_trains_and_is_predicted(train_shards, tiny_llm, spec_file, tmp_path):
    """The demo recipe's settings on a dataset of its own (demo_cls_en's samples under new class names), then its
    exported package predicts unlabeled JSONL in a fresh process: the spec travels with the model."""
    root = str(tmp_path / "shards")
    build_custom(train_shards, spec_file, tmp_path, root)
    out = str(tmp_path / "run")
    args = [f"--data.root={root}", "--data.train={my_clips = 1.0}", "--data.eval=['my_clips']"]
    args += [f"--llm.path={tiny_llm}", f"--train.output_dir={out}", "--train.steps=4", "--eval.every=0"]
    args += ["--data.batch_size=4", "--data.num_workers=0", "--optim.warmup_steps=1", "--mlflow.system_metrics=false"]
    args += ["--eval.modes=['constrained']"]
    done = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert "final/test/my_clips/constrained/wf1" in final["reported"]
    package = str(tmp_path / "package")
    done = subprocess.run(
        [sys.executable, "-m", "egmf.train.export_main", "--model", f"{out}/best", "--out", package],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(root)  # the package alone: no shards, no manifests to read the spec from
    unlabeled = split_as_jsonl(train_shards, "demo_cls_en", "test", str(tmp_path / "new"), labels=False)
    predictions = str(tmp_path / "predictions.jsonl")
    command = ["--model", package, "--data", unlabeled, "--datasets", "my_clips", "--out", predictions]
    done = subprocess.run(
        [sys.executable, "-m", "egmf.train.predict_main", *command], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = rows(predictions)
    assert len(predicted) == load_manifest(train_shards, "demo_cls_en", "test").num_samples
    for row in predicted:
        assert set(row["probabilities"]) == {"calm", "happy", "sad", "angry"} and "label" not in row
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5 and abs(sum(row["gate"].values()) - 1) < 1e-5
        assert row["prediction"] == max(row["probabilities"], key=row["probabilities"].get)
    # a built-in dataset featurised like my_clips takes its front ends (fusion.shared_front_ends), answering in
    # its own classes
    shared = str(tmp_path / "shared.jsonl")
    command = ["--model", package, "--data", unlabeled, "--datasets", "demo_cls_en", "--out", shared]
    assert predict_main.main([*command, "--fusion.shared_front_ends.demo_cls_en=my_clips"]) == 0
    assert {tuple(row["probabilities"]) for row in rows(shared)} == {("neutral", "joy", "sadness", "anger")}
    assert predict_main.main(command) == 2  # without it, the model does not take demo_cls_en
