"""Checks that run before any process group starts, so a bad launch fails in seconds with every problem named.

The config's keys and values are checked by `load_config`; here: the output
folder, the tracking server, the model directory, the shards of every dataset
and split the run reads, their feature dims and labels, and the checkpoint to
resume. The embedded default (demo shards, tiny
model) is exempt from the existence checks: its assets are built when missing.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

from egmf.demo_assets import demo_assets_missing
from egmf.errors import CheckpointError, ConfigError, DataError, ModelPathError
from egmf.model.fusion import check_feature_dims
from egmf.model.llm import check_model_dir
from egmf.shards.manifest import SplitManifest, load_manifest
from egmf.tracking import tracking_uri
from egmf.train.checkpoint import resolve_resume, saved_weights
from egmf.train.config import Config

logger = logging.getLogger("egmf.train")
HEALTH_TIMEOUT_S = 5


def splits_read(cfg: Config) -> list[tuple[str, str]]:
    return [(d, "train") for d in cfg.data.train] + [(d, s) for d in cfg.data.eval for s in cfg.eval.splits]


def needs_demo_assets(cfg: Config) -> bool:
    return demo_assets_missing(cfg.data.root, splits_read(cfg), cfg.llm.path)


def model_manifests(cfg: Config) -> dict[str, SplitManifest]:
    """The manifest the model takes each dataset's front end from: its train split (eval-only datasets: their
    first eval split)."""
    manifests = {}
    for dataset, split in splits_read(cfg):
        if dataset not in manifests:
            manifests[dataset] = load_manifest(cfg.data.root, dataset, split)
    return manifests


def feature_dims(cfg: Config) -> dict[str, tuple[int, int]]:
    """(audio, vision) dims per dataset."""
    return {name: (m.audio_dim, m.vision_dim) for name, m in model_manifests(cfg).items()}


def feature_stats(cfg: Config) -> dict[str, dict]:
    """Per dataset, the feature statistics the model standardises with; shards built without them are named in a
    warning (their inputs pass through unchanged)."""
    manifests = model_manifests(cfg)
    missing = [f"{m.dataset}/{m.split}" for m in manifests.values() if not m.feature_stats]
    if missing:
        logger.warning(
            "%s: the shards hold no feature statistics, so those inputs are not standardised; rebuild them with "
            "egmf-shards build (or egmf-shards demo)",
            ", ".join(missing),
        )
    return {name: m.feature_stats for name, m in manifests.items() if m.feature_stats}


def unlabeled_problems(manifests: list[SplitManifest]) -> list[str]:
    """Training learns from its train splits and selects and reports on its evaluation splits: all need labels."""
    return [
        f"{m.dataset}/{m.split} has no labels (built from unlabeled samples): training needs labeled train and "
        "evaluation splits. Predict on it with egmf-predict, or rebuild it with labels"
        for m in manifests
        if not m.labeled
    ]


def output_problems(output_dir: str) -> list[str]:
    """The output folder must be creatable and writable (checked on its nearest existing folder; nothing is
    created here)."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "is a file" if not os.path.isdir(existing) else "is not writable"
        return [f"train.output_dir {output_dir}: {existing} {why}; choose an output folder you can write to"]
    return []


def tracking_problems(cfg: Config) -> list[str]:
    """A tracking server must answer before the run starts (MLflow's client would retry for minutes, then fail)."""
    uri = tracking_uri(cfg.mlflow, cfg.train.output_dir)
    if not cfg.mlflow.enabled or not uri.startswith(("http://", "https://")):
        return []
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return []  # it answers (a login in front of it may refuse /health): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [
            f"the MLflow tracking server {uri} does not answer ({reason}); start it (docs/cluster.md), point "
            "--mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) at one that runs, or train without it: "
            "--mlflow.enabled=false"
        ]
    return []


def preflight(cfg: Config) -> None:
    """Raise ConfigError naming every problem found; demo assets that will be built are not problems."""
    unwritable = output_problems(cfg.train.output_dir)
    problems = unwritable + tracking_problems(cfg)
    if not needs_demo_assets(cfg):
        try:
            check_model_dir(cfg.llm.path)
        except ModelPathError as exc:
            problems.append(str(exc))
        try:
            manifests = [load_manifest(cfg.data.root, d, s) for d, s in splits_read(cfg)]
            check_feature_dims(feature_dims(cfg), manifests)
            problems += unlabeled_problems(manifests)
        except DataError as exc:
            problems.append(str(exc))
    resume_from = None
    try:
        if not unwritable:  # an output folder that cannot exist holds no checkpoint to resume
            resume_from = resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)
    except CheckpointError as exc:
        problems.append(str(exc))
    if cfg.train.init_from and resume_from is None:  # a resumed run's weights come from its checkpoint
        try:
            saved_weights(cfg.train.init_from)
        except CheckpointError as exc:
            problems.append(f"train.init_from: {exc}")
    if problems:
        raise ConfigError("cannot start:\n  " + "\n  ".join(problems))
