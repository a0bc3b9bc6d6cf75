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

import json
import logging
import os
import time
from dataclasses import dataclass

from egmf.atomic import write_json
from egmf.distributed import WorldInfo

logger = logging.getLogger("egmf.train")

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
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


class NullTracker:
    """What every rank but the logging one gets."""

    run_id: str | None = None
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

    def end(self, status: str) -> None:
        pass


def tracking_uri(cfg: MLflowConfig, output_dir: str) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(output_dir, 'mlflow.db'))}"


class MLflowTracker(NullTracker):
    def __init__(self, cfg: MLflowConfig, output_dir: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        os.makedirs(output_dir, exist_ok=True)
        self.uri = tracking_uri(cfg, output_dir)
        self.client = MlflowClient(self.uri)
        self.run_id = self._continue_run(run_id) if run_id else None
        if self.run_id is None:
            experiment_id = self._experiment_id(cfg.experiment, output_dir)
            run_name = cfg.run_name or os.path.basename(os.path.abspath(output_dir))
            tags = {PARENT_TAG: cfg.parent_run_id} if cfg.parent_run_id else None
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.monitor = None
        if cfg.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=bool(run_id), tracking_uri=self.uri)
            self.monitor.start()

    def _experiment_id(self, name: str, output_dir: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # A local store keeps artifacts beside it; a server uses its own artifact root.
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            location = "file://" + os.path.abspath(os.path.join(output_dir, "mlartifacts"))
        return self.client.create_experiment(name, artifact_location=location)

    def _continue_run(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            logger.warning("MLflow run %s from the checkpoint is not in %s; starting a new run", run_id, self.uri)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: dict[str, object]) -> None:
        """Params are immutable in MLflow: on a resumed run, changed values are recorded as tags instead."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, _param_text(v)) for k, v in params.items() if k not in logged]
        changed = [
            RunTag(f"changed_on_resume.{k}", f"{logged[k]} -> {_param_text(v)}")
            for k, v in params.items()
            if k in logged and logged[k] != _param_text(v)
        ]
        for part in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[part : part + 100])
        if changed:
            logger.warning("config changed since the run started: %s", ", ".join(t.key for t in changed))
            self.client.log_batch(self.run_id, tags=changed)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for part in range(0, len(batch), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=batch[part : part + MAX_METRICS_PER_CALL])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def end(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, status)


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
