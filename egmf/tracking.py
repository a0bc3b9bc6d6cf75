"""Experiment tracking behind a tiny interface: MLflow on the logging rank, a no-op everywhere else.

    tracker = open_tracker(cfg.mlflow, output_dir, world, run_id=saved_run_id)
    tracker.log_params(flat_config); tracker.log_metrics({"train/loss": 0.7}, step=10)
    tracker.end("FINISHED")     # or "FAILED" / "KILLED": never left to MLflow's exit hook

Only one process talks to MLflow, so a job is one run however many ranks it
has (mlflow #11782). A resumed job passes the run id saved with its
checkpoint and continues that run (transformers #30563). `mlflow` is imported
only here and only on the logging rank (it costs seconds to import).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

from egmf.atomic import write_json
from egmf.distributed import WorldInfo
from egmf.mlflow_local import artifact_root, relocate_artifacts, store_uri
from egmf.tracking_outbox import TARGET, UNSENT_DIR, Outbox, RecordRejected, kept_files, send_records

logger = logging.getLogger("egmf.train")

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
"""The experiment tag by which MLflow 3's UI opens an experiment in its model-training view (not the GenAI one)."""
DESCRIPTION_TAG = "mlflow.note.content"
"""The run's description in MLflow's UI (Markdown)."""
PARENT_TAG = "mlflow.parentRunId"
"""The tag by which MLflow (and its UI) nests a run under another."""
RUN_RECORD = "mlflow_run.json"
"""OUTPUT_DIR/mlflow_run.json: where the job's run is, for whoever must end it when the logging rank cannot."""


@dataclass
class MLflowConfig:
    enabled: bool = True
    """Track the run in MLflow (on the logging rank only)."""
    tracking_uri: str = ""
    """Tracking store; empty: $MLFLOW_TRACKING_URI when set, else sqlite:///OUTPUT_DIR/mlflow.db."""
    experiment: str = "egmf"
    """Experiment the run belongs to."""
    run_name: str = ""
    """Run name; empty: the output folder's name."""
    system_metrics: bool = True
    """Log CPU/GPU/memory metrics of the logging rank's node in the background."""
    parent_run_id: str = ""
    """Make the run a child of this run (egmf-sweep: one child per seed under the sweep's parent run)."""
    log_model: bool = False
    """At the end, export the best model as a package (OUTPUT_DIR/package) and log it as an MLflow pyfunc model."""
    register_as: str = ""
    """With log_model: register the logged model under this name in the Model Registry."""
    retry_s: float = 10.0
    """While the tracking server is unreachable: seconds between tries to send what was kept (training goes on)."""
    flush_timeout_s: float = 600.0
    """At the end of the run: the longest wait for queued records (artifacts included) to reach the server."""
    max_unsent_mb: int = 256
    """Records kept on disk while the server is unreachable, at most (later metric records are then dropped)."""


class NullTracker:
    """What every rank but the logging one gets."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri: str = ""

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, figure, artifact_file: str) -> None:
        pass

    def log_inputs(self, datasets: list[dict]) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def tracking_uri(cfg: MLflowConfig, output_dir: str) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return store_uri(output_dir)


HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""Per-call bounds on talking to a tracking server (MLflow's own defaults retry for minutes); a user's values win."""


class MLflowTracker(NullTracker):
    """The run is created (or continued) at once; everything logged later goes through an Outbox
    (egmf/tracking_outbox.py), so the training thread never waits on the server or fails because of it."""

    def __init__(self, cfg: MLflowConfig, output_dir: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        os.makedirs(output_dir, exist_ok=True)
        self.cfg, self.uri = cfg, tracking_uri(cfg, output_dir)
        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        if self.uri == store_uri(output_dir):
            relocate_artifacts(output_dir)  # the folder may have moved since the store was made (a resumed run)
        self.client = MlflowClient(self.uri)
        self.run_id = self._continue_run(run_id) if run_id else None
        if self.run_id is None:
            experiment_id = self._experiment_id(cfg.experiment, output_dir)
            run_name = cfg.run_name or os.path.basename(os.path.abspath(output_dir))
            tags = {PARENT_TAG: cfg.parent_run_id} if cfg.parent_run_id else None
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        target = {"tracking_uri": self.uri, "run_id": self.run_id}
        self.outbox = Outbox(
            record_sender(self.uri, self.run_id), output_dir, target, cfg.retry_s, cfg.max_unsent_mb * 2**20
        )
        self.monitor = None
        if cfg.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=bool(run_id), tracking_uri=self.uri)
            self.monitor.start()

    def _experiment_id(self, name: str, output_dir: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND not in experiment.tags:
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
            return experiment.experiment_id
        # A local store keeps artifacts beside it; a server uses its own artifact root.
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            location = artifact_root(output_dir)
        return self.client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})

    def _continue_run(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            logger.warning("MLflow run %s from the checkpoint is not in %s; starting a new run", run_id, self.uri)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, params: dict[str, object]) -> None:
        self.outbox.put({"op": "params", "values": {k: _param_text(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.outbox.put({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.outbox.put({"op": "metrics", "step": step, "timestamp": int(time.time() * 1000), "values": values})

    def log_inputs(self, datasets: list[dict]) -> None:
        """Datasets the run reads, shown as the run's inputs: each {name, digest, source, context, profile}."""
        self.outbox.put({"op": "inputs", "datasets": datasets})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.outbox.away_since:  # it will wait: keep it as it is now
            path = self.outbox.keep_file(path, os.path.basename(os.path.normpath(path)))
        self.outbox.put({"op": "artifact", "path": path, "artifact_path": artifact_path})

    def log_figure(self, figure, artifact_file: str) -> None:
        folder, name = os.path.split(artifact_file)
        path = os.path.join(self.outbox.folder, "figures", str(time.time_ns()), name)
        os.makedirs(os.path.dirname(path))
        figure.savefig(path)
        self.outbox.put({"op": "artifact", "path": path, "artifact_path": folder or None})

    def flush(self) -> None:
        """Send what was logged (the run stays RUNNING); nothing can be logged afterwards."""
        self.outbox.close(self.cfg.flush_timeout_s)

    def end(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.outbox.put({"op": "end", "status": status})
        if not self.outbox.close(self.cfg.flush_timeout_s):
            logger.warning(
                "the MLflow run %s is not complete on %s until its kept records are sent", self.run_id, self.uri
            )


def record_sender(uri: str, run_id: str):
    """send(record): one outbox record (egmf/tracking_outbox.py) as MLflow calls on run `run_id`. A request the
    server answers with a client error (a bad value) raises RecordRejected; anything else is an outage."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def log_params(values: dict[str, str]) -> None:
        """Params are immutable in MLflow: on a resumed run, changed values are recorded as tags instead."""
        logged = client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [
            RunTag(f"changed_on_resume.{k}", f"{logged[k]} -> {v}") for k, v in values.items() if logged.get(k, v) != v
        ]
        for part in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            client.log_batch(run_id, params=new[part : part + 100])
        if changed:
            logger.warning("config changed since the run started: %s", ", ".join(t.key for t in changed))
            client.log_batch(run_id, tags=changed)

    def log_metrics(record: dict) -> None:
        batch = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["values"].items()]
        for part in range(0, len(batch), MAX_METRICS_PER_CALL):
            client.log_batch(run_id, metrics=batch[part : part + MAX_METRICS_PER_CALL])

    def log_artifact(path: str, artifact_path: str | None) -> None:
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path)
        else:
            client.log_artifact(run_id, path, artifact_path)

    def send(record: dict) -> None:
        op = record["op"]
        try:
            if op == "metrics":
                log_metrics(record)
            elif op == "params":
                log_params(record["values"])
            elif op == "tags":
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["values"].items()])
            elif op == "artifact":
                log_artifact(record["path"], record["artifact_path"])
            elif op == "inputs":
                client.log_inputs(run_id, datasets=[dataset_input(d) for d in record["datasets"]])
            elif op == "end":
                client.set_terminated(run_id, record["status"])
        except MlflowException as exc:
            if 400 <= exc.get_http_status_code() < 500:
                raise RecordRejected(str(exc)[:300]) from None
            raise

    return send


def dataset_input(facts: dict):
    """An MLflow DatasetInput from {name, digest, source, context, profile}."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        facts["name"], facts["digest"], "local", json.dumps({"uri": facts["source"]}), None, facts["profile"]
    )
    return DatasetInput(dataset, [InputTag("mlflow.data.context", facts["context"])])


def write_run_record(output_dir: str, tracker: NullTracker) -> None:
    if tracker.run_id:
        write_json(os.path.join(output_dir, RUN_RECORD), {"tracking_uri": tracker.uri, "run_id": tracker.run_id})


def close_unfinished_run(output_dir: str, status: str, failure_notes: str = "") -> str:
    """End the job's MLflow run with `status` if it is still RUNNING; say what was done.

    For the job script after its ranks are gone: a rank killed outright (out of memory, SIGKILL, a
    timed-out NCCL abort) never reaches its own `end`. `failure_notes` become the run's `failure` tag.
    """
    from mlflow.tracking import MlflowClient

    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.exists(path):
        return f"no MLflow run recorded in {output_dir} (the job stopped before tracking started)"
    with open(path) as f:
        record = json.load(f)
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    if run.info.status != "RUNNING":
        return f"MLflow run {run.info.run_id} already ended {run.info.status}"
    if failure_notes:
        client.set_tag(run.info.run_id, "failure", failure_notes[:5000])
    client.set_terminated(run.info.run_id, status)
    return f"MLflow run {run.info.run_id} was still RUNNING; marked {status}"


def _param_text(value: object) -> str:
    return str(value)[:6000]  # MLflow's param value limit


def open_tracker(cfg: MLflowConfig, output_dir: str, world: WorldInfo, run_id: str | None = None) -> NullTracker:
    if not cfg.enabled or not world.is_logging_rank:
        return NullTracker()
    return MLflowTracker(cfg, output_dir, run_id)


def flatten(config: dict) -> dict[str, object]:
    """{"data": {"batch_size": 8, "train": {...}}} -> {"data.batch_size": 8, "data.train": {...}}: a param a field."""
    return {f"{section}.{key}": value for section, fields in config.items() for key, value in fields.items()}


def sync_main(argv: list[str] | None = None) -> int:
    """`egmf-mlflow-sync OUTPUT_DIR`: send a run's kept MLflow records now that the server is back."""
    parser = argparse.ArgumentParser(prog="egmf-mlflow-sync", description=sync_main.__doc__.split(": ", 1)[1])
    parser.add_argument("output_dir", help="the run's output folder (train.output_dir)")
    args = parser.parse_args(argv)
    folder = os.path.join(args.output_dir, UNSENT_DIR)
    files = kept_files(folder)
    if not files:
        print(f"nothing to send: {folder} holds no kept records")
        return 0
    with open(os.path.join(folder, TARGET)) as f:
        target = json.load(f)
    send = record_sender(target["tracking_uri"], target["run_id"])
    sent = 0
    for path in files:  # in order: a file is sent only once those before it are
        done = send_records(path, send)
        if done is None:
            print(f"error: {target['tracking_uri']} still does not take the records; the rest is kept", file=sys.stderr)
            return 1
        sent += done
    shutil.rmtree(folder)
    print(f"{sent} record(s) sent to run {target['run_id']} at {target['tracking_uri']}")
    return 0
