"""Tracking that survives its server: records kept on disk while it is away and sent in order when it is back,
bounded waits, a note and egmf-mlflow-sync when a run ends before it returns, an unreachable server refused before
a run starts, and a real server killed and restarted in the middle of a real run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from run_helpers import REPO, SMALL_EVAL, run_args

from egmf.distributed import free_port
from egmf.tracking import record_sender, sync_main
from egmf.tracking_outbox import NOTE, RECORDS, RECORDS_AT_CLOSE, UNSENT_DIR, Outbox, RecordRejected
from egmf.train.config import load_config
from egmf.train.preflight import preflight


class FlakyServer:
    """Stands in for the tracking server in the outbox's own tests: takes records, or fails while `away`."""

    def __init__(self):
        self.away, self.received = False, []

    def send(self, record: dict) -> None:
        if self.away:
            raise ConnectionError("Connection refused")
        if record.get("values", {}).get("bad") == "value":
            raise RecordRejected("INVALID_PARAMETER_VALUE")
        self.received.append(record)


def metrics(step: int) -> dict:
    return {"op": "metrics", "step": step, "timestamp": 0, "values": {"loss": 1.0 / step}}


def wait_for(condition, timeout_s: float = 20) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline
        time.sleep(0.05)


def test_records_wait_on_disk_while_the_server_is_away_and_arrive_in_order(tmp_path):
    server = FlakyServer()
    outbox = Outbox(server.send, str(tmp_path), {"tracking_uri": "x", "run_id": "y"}, retry_s=0.2)
    outbox.put(metrics(1))
    wait_for(lambda: len(server.received) == 1)
    server.away = True
    for step in (2, 3, 4):
        outbox.put(metrics(step))
    kept = tmp_path / UNSENT_DIR / RECORDS
    wait_for(lambda: kept.exists() and len(kept.read_text().splitlines()) == 3)
    assert outbox.away_since is not None and [r["step"] for r in server.received] == [1]
    outbox.put({"op": "tags", "values": {"bad": "value"}})  # refused by a server that answers: dropped, not kept
    server.away = False
    outbox.put(metrics(5))
    wait_for(lambda: len(server.received) == 5 and outbox.away_since is None)
    assert [r["step"] for r in server.received] == [1, 2, 3, 4, 5] and not kept.exists()
    assert outbox.close(10) and not (tmp_path / UNSENT_DIR).exists()


def test_a_run_that_ends_while_the_server_is_away_keeps_its_records_and_says_how_to_send_them(tmp_path):
    """...and egmf-mlflow-sync sends them, the end status included, to a real MLflow store."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    server = FlakyServer()
    server.away = True
    outbox = Outbox(server.send, str(tmp_path / "run"), {"tracking_uri": store, "run_id": run_id}, retry_s=0.2)
    for step in (1, 2, 3):
        outbox.put(metrics(step))
    outbox.put({"op": "tags", "values": {"stage": "done"}})
    outbox.put({"op": "end", "status": "FINISHED"})
    started = time.time()
    assert outbox.close(30) is False and time.time() - started < 10  # a bounded wait, not MLflow's minutes
    note = (tmp_path / "run" / UNSENT_DIR / NOTE).read_text()
    assert "5 record(s) are kept" in note and f"egmf-mlflow-sync {tmp_path / 'run'}" in note
    assert client.get_run(run_id).info.status == "RUNNING"
    assert sync_main([str(tmp_path / "run")]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "done"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert not (tmp_path / "run" / UNSENT_DIR).exists()


class StuckServer(FlakyServer):
    """A server whose call for record `hang_on` (a metrics step) does not return until `release` is set; it then
    answers as `away` says."""

    def __init__(self, hang_on: int):
        super().__init__()
        self.hang_on, self.release, self.hanging = hang_on, threading.Event(), threading.Event()

    def send(self, record: dict) -> None:
        if record.get("step") == self.hang_on and not self.release.is_set():
            self.hanging.set()  # set only by a call that blocks
            self.release.wait(30)
        super().send(record)


def new_run(tmp_path, name: str) -> tuple[MlflowClient, str, str]:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    return client, store, client.create_run(client.create_experiment(name)).info.run_id


def test_a_close_that_times_out_in_a_call_keeps_that_record_and_the_queue_in_order(tmp_path):
    """The call for step 1 hangs; close gives up. Step 1 (its call still running) and the queued 2 and 3 are kept
    in order, and the failure that ends the hung call afterwards keeps nothing twice."""
    client, store, run_id = new_run(tmp_path, "stuck-call")
    server = StuckServer(hang_on=1)
    outbox = Outbox(server.send, str(tmp_path / "run"), {"tracking_uri": store, "run_id": run_id}, retry_s=0.2)
    for step in (1, 2, 3):
        outbox.put(metrics(step))
    assert server.hanging.wait(10)
    assert outbox.close(0.5) is False
    server.away = True
    server.release.set()  # the hung call fails now
    outbox.thread.join(10)
    assert not outbox.thread.is_alive()
    note = (tmp_path / "run" / UNSENT_DIR / NOTE).read_text()
    assert "3 record(s) are kept" in note and "had not returned after 0.5 s" in note
    assert not (tmp_path / "run" / UNSENT_DIR / RECORDS).exists()
    kept = (tmp_path / "run" / UNSENT_DIR / RECORDS_AT_CLOSE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2, 3]
    assert sync_main([str(tmp_path / "run")]) == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]


def test_a_close_that_times_out_while_kept_records_are_resent_loses_none(tmp_path):
    """The server is away, steps 1-2 are kept; the resend of step 1 hangs when the run closes with step 3 queued.
    The resend then succeeds and empties records.jsonl: step 3, taken over by close, is still kept and synced."""
    client, store, run_id = new_run(tmp_path, "stuck-retry")
    server = StuckServer(hang_on=1)
    server.away = True
    server.release.set()
    outbox = Outbox(server.send, str(tmp_path / "run"), {"tracking_uri": store, "run_id": run_id}, retry_s=0.2)
    outbox.put(metrics(1))
    outbox.put(metrics(2))
    wait_for(lambda: outbox.away_since is not None and outbox.unsent() == 2)
    server.release.clear()
    assert server.hanging.wait(10)  # the resend of step 1
    outbox.put(metrics(3))
    assert outbox.close(0.5) is False
    server.away = False
    server.release.set()  # the resend succeeds: steps 1 and 2 reach the server
    outbox.thread.join(10)
    assert [r["step"] for r in server.received] == [1, 2]
    kept = (tmp_path / "run" / UNSENT_DIR / RECORDS_AT_CLOSE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [3]
    assert sync_main([str(tmp_path / "run")]) == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]


def test_the_mlflow_sender_tells_a_refused_record_from_an_outage(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("refusals")).info.run_id
    send = record_sender(store, run_id)
    send({"op": "params", "values": {"lr": "0.1"}})
    send({"op": "params", "values": {"lr": "0.2"}})  # params are immutable: a change becomes a tag
    assert client.get_run(run_id).data.tags["changed_on_resume.lr"] == "0.1 -> 0.2"
    with pytest.raises(RecordRejected):
        send({"op": "metrics", "step": 1, "timestamp": 0, "values": {"x" * 300: 1.0}})  # a key MLflow refuses
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own default retries for minutes
    with pytest.raises(Exception) as raised:
        record_sender(f"http://127.0.0.1:{free_port()}", run_id)({"op": "tags", "values": {"a": "b"}})
    assert not isinstance(raised.value, RecordRejected)


def test_an_unreachable_tracking_server_or_an_unwritable_output_stops_the_run_before_it_starts(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    cfg = load_config(None, [f"--mlflow.tracking_uri={url}", f"--train.output_dir={blocked}/run"])
    started = time.time()
    with pytest.raises(Exception, match=r"(?s)is a file; choose an output folder.*tracking server .* does not answer"):
        preflight(cfg)
    assert time.time() - started < 10


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free port that the test can stop and start again on the same store."""
    port, store = free_port(), f"sqlite:///{tmp_path}/server.db"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", store, "--artifacts-destination", str(tmp_path / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    processes = []

    def start():
        log = open(tmp_path / f"server{len(processes)}.log", "w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True))
        client = MlflowClient(f"http://127.0.0.1:{port}")
        wait = time.time() + 120
        while True:
            try:
                client.search_experiments()
                return
            except Exception:
                assert time.time() < wait and processes[-1].poll() is None, "the MLflow server did not start"
                time.sleep(1)

    def stop():
        os.killpg(processes[-1].pid, signal.SIGKILL)
        processes[-1].wait(30)

    start()
    yield f"http://127.0.0.1:{port}", start, stop
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow  # a real server, killed and restarted under a 300-step run (about a minute)
def test_a_run_whose_server_is_killed_and_restarted_finishes_with_every_metric_step(
    mlflow_server, train_shards, tiny_llm, tmp_path
):
    url, start, stop = mlflow_server
    out = str(tmp_path / "run")
    args = run_args(train_shards, tiny_llm, out, "--train.steps=300", "--eval.every=0", "--checkpoint.every=0")
    args += [*SMALL_EVAL, f"--mlflow.tracking_uri={url}", "--mlflow.retry_s=1", "--mlflow.system_metrics=false"]
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    log = open(tmp_path / "train.log", "w")
    training = subprocess.Popen(
        [sys.executable, "launch/train.py", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    client = MlflowClient(url)

    def logged_steps() -> list[int]:
        experiment = client.get_experiment_by_name("egmf")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []

    deadline = time.time() + 600
    while len(logged_steps()) < 3:  # the run is under way and logging
        assert training.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(1)
    stop()
    time.sleep(5)  # steps go by without the server; the run must outlast it (about 0.2 s a step here)
    start()
    assert training.wait(600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    text = (tmp_path / "train.log").read_text()
    assert "MLflow tracking is unreachable" in text and "answers again" in text
    assert sorted(logged_steps()) == list(range(1, 301))
    run = client.search_runs([client.get_experiment_by_name("egmf").experiment_id])[0]
    assert run.info.status == "FINISHED" and not os.path.exists(os.path.join(out, UNSENT_DIR))
    assert json.load(open(os.path.join(out, "final_metrics.json")))["step"] == 300
