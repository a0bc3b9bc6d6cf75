"""Browsing runs: `make mlflow-ui` serves a real MLflow server on loopback, a short run logs to it over HTTP, and
headless Chromium renders the run's page, its metrics and its artifacts (the rendered DOM is read, not a status
code), and the runs table is screenshot."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from conftest import require_binaries
from mlflow.tracking import MlflowClient
from run_helpers import REPO, SMALL_EVAL, run_args

from egmf.distributed import free_port

RUN_NAME = "ui-check"


pytestmark = pytest.mark.browser


def chromium() -> str:
    require_binaries("chromium", install="apt-get install chromium fonts-noto-cjk")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The URL of `make mlflow-ui` on a fresh store and a free port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    prefix = sys.prefix  # the venv running the tests is the project's
    command = ["make", "--no-print-directory", "-o", f"{prefix}/.installed", "mlflow-ui", f"VENV={prefix}"]
    command += [f"MLFLOW_STORE={root}/mlflow.db", f"MLFLOW_ARTIFACTS={root}/artifacts", f"MLFLOW_PORT={port}"]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not healthy(url):
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.read().strip() == b"OK"
    except OSError:
        return False


@pytest.fixture(scope="module")
def run_on_server(mlflow_server, train_shards, tiny_llm, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ui-run") / "out")
    args = run_args(train_shards, tiny_llm, out, "--train.steps=4", "--eval.every=0", "--checkpoint.every=0")
    args += ["--optim.warmup_steps=1"]
    args += [*SMALL_EVAL, f"--mlflow.tracking_uri={mlflow_server}", f"--mlflow.run_name={RUN_NAME}"]
    done = subprocess.run(
        [sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("egmf").experiment_id])[0]
    assert f"browse the run: {mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in (
        done.stdout
    )
    return run


def browser(url: str, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium without background networking (the machine may be offline); the virtual time budget lets
    the page's scripts finish."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        command += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
        command += ["--window-size=1800,1000", "--virtual-time-budget=15000", *action, url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rendered_text(url: str) -> str:
    """The page's visible text after its scripts have run."""
    dom = browser(url, "--dump-dom").stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def as_javascript_prints(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def test_run_page_shows_the_run_and_its_evaluation_metrics(mlflow_server, run_on_server):
    run = run_on_server
    text = rendered_text(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    assert RUN_NAME in text and run.info.run_id in text, text[:3000]
    wf1 = "eval/test/demo_cls_en/constrained/wf1"
    assert f"{wf1} {as_javascript_prints(run.data.metrics[wf1])}" in text, text[:5000]
    assert "train/loss" in text and "best/selection_score" in text


def test_run_page_lists_the_artifacts(mlflow_server, run_on_server):
    run = run_on_server
    text = rendered_text(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts")
    for folder in ("best_model", "config", "plots", "predictions"):
        assert re.search(rf"\b{folder}\b", text), (folder, text[-2000:])
    # the files are served through the server (proxied artifacts), not read from the trainer's disk
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")


def test_runs_table_renders_and_screenshots(mlflow_server, run_on_server, tmp_path):
    run = run_on_server
    url = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs"
    assert RUN_NAME in rendered_text(url)
    shot = tmp_path / "runs.png"
    browser(url, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
