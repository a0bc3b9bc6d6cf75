"""A run folder's own MLflow store keeps its artifacts after the folder is moved: a resumed run relocates them, and
egmf-mlflow-ui serves them from the new place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from egmf.distributed import free_port
from egmf.mlflow_local import relocate_artifacts, store_uri
from egmf.tracking import MLflowConfig, MLflowTracker


def artifact_names(output_dir: str, run_id: str) -> list[str]:
    """What MLflow finds of a run's artifacts through the folder's store at its current place."""
    return sorted(f.path for f in MlflowClient(store_uri(output_dir)).list_artifacts(run_id))


def run_with_artifact(output_dir: str, name: str, run_id: str | None = None) -> str:
    tracker = MLflowTracker(MLflowConfig(system_metrics=False), output_dir, run_id)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        f.write(name)
    tracker.log_artifact(path)
    tracker.end("FINISHED")
    return tracker.run_id


def test_a_moved_run_folder_finds_its_artifacts_and_a_resumed_run_adds_to_them(tmp_path):
    first = str(tmp_path / "first")
    run_id = run_with_artifact(first, "config.json")
    assert artifact_names(first, run_id) == ["config.json"]
    moved = str(tmp_path / "elsewhere" / "moved")
    shutil.move(first, moved)
    assert artifact_names(moved, run_id) == []  # MLflow's absolute location still points at the old place
    assert relocate_artifacts(moved) == 2  # the experiment and the run
    assert artifact_names(moved, run_id) == ["config.json"]
    assert relocate_artifacts(moved) == 0  # nothing moved since
    again = str(tmp_path / "again")
    shutil.move(moved, again)
    # a resumed run opens the store in a new process (MLflow caches a run's artifact location per process)
    resume = "from test_mlflow_local import run_with_artifact as run; "
    resume += f"print(run({again!r}, 'after_resume.txt', {run_id!r}))"
    done = subprocess.run([sys.executable, "-c", resume], cwd=os.path.dirname(__file__), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[-1] == run_id, done.stderr[-3000:]
    assert artifact_names(again, run_id) == ["after_resume.txt", "config.json"]
    location = MlflowClient(store_uri(again)).get_run(run_id).info.artifact_uri
    assert location == "file://" + os.path.join(again, "mlartifacts", run_id, "artifacts")


@pytest.mark.slow
def test_egmf_mlflow_ui_serves_a_moved_folders_artifacts(tmp_path):
    run_id = run_with_artifact(str(tmp_path / "run"), "notes.txt")
    moved = str(tmp_path / "moved")
    shutil.move(str(tmp_path / "run"), moved)
    port = free_port()
    ui = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "egmf-mlflow-ui"), moved, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}"
        deadline = time.time() + 120
        while True:
            assert ui.poll() is None, ui.stdout.read()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    listing = json.load(response)
                break
            except OSError:
                assert time.time() < deadline, "egmf-mlflow-ui did not answer in 120 s"
                time.sleep(1)
        assert [f["path"] for f in listing["files"]] == ["notes.txt"]
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_egmf_mlflow_ui_refuses_a_folder_without_a_store(tmp_path):
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "egmf-mlflow-ui"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "holds no MLflow store" in done.stderr
