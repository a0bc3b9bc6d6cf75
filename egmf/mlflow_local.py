"""A run folder's own MLflow store (OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlartifacts) that still works
after the folder is moved or copied to another machine.

    moved = relocate_artifacts(OUTPUT_DIR)      # the number of experiments and runs whose paths were rewritten
    egmf-mlflow-ui OUTPUT_DIR [--port 5000]     # relocate, then `mlflow ui` on that store (ui_main)

MLflow stores artifact locations as absolute `file://` URIs (it turns a relative
location into an absolute one when the experiment is created), so a moved
folder's store points at the old place. The store is the folder's own, so its
locations are rewritten to the folder's current place: whenever training opens
the store (a resumed or continued run) and by `egmf-mlflow-ui`. Only
locations under the folder's own `mlartifacts` are touched. A tracking server
with proxied artifacts (`mlflow server`, whose artifact URIs are
`mlflow-artifacts:/...`) needs none of this.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys

logger = logging.getLogger("egmf.train")

STORE = "mlflow.db"
ARTIFACTS = "mlartifacts"


def store_uri(output_dir: str) -> str:
    """The tracking URI of a run folder's own store."""
    return f"sqlite:///{os.path.abspath(os.path.join(output_dir, STORE))}"


def artifact_root(output_dir: str) -> str:
    """The artifact location of the experiments in a run folder's own store."""
    return "file://" + os.path.abspath(os.path.join(output_dir, ARTIFACTS))


def relocate_artifacts(output_dir: str) -> int:
    """Point the artifact locations of OUTPUT_DIR/mlflow.db at OUTPUT_DIR/mlartifacts where the folder was moved:
    the number of experiment and run rows rewritten (0 when nothing moved or there is no store).

    MLflow has no call to change an artifact location, so its tables are updated directly: experiments'
    `artifact_location` and runs' `artifact_uri`, the same columns in every MLflow release since 1.0."""
    path = os.path.join(output_dir, STORE)
    if not os.path.exists(path):
        return 0
    here = artifact_root(output_dir)
    with sqlite3.connect(path) as db:
        locations = db.execute("SELECT artifact_location FROM experiments").fetchall()
        moved = {old for (old,) in locations if is_moved_root(old, here)}
        changed = 0
        for old in moved:
            changed += db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, old)
            ).rowcount
            changed += db.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, len(old) + 1, old + "/"),
            ).rowcount
    if changed:
        logger.info("MLflow store %s was moved: its artifact locations now point at %s", path, here)
    return changed


def is_moved_root(location: str | None, here: str) -> bool:
    """A run folder's own artifact root (file://.../mlartifacts) at another place than `here`."""
    return bool(location) and location.startswith("file://") and location.endswith("/" + ARTIFACTS) and location != here


def ui_main(argv: list[str] | None = None) -> int:
    """`egmf-mlflow-ui OUTPUT_DIR`: browse a run folder's own MLflow store, wherever the folder now is."""
    parser = argparse.ArgumentParser(prog="egmf-mlflow-ui", description=ui_main.__doc__.split(": ", 1)[1])
    parser.add_argument("output_dir", help="the run's output folder (train.output_dir), moved or not")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.output_dir, STORE)):
        print(f"error: {args.output_dir} holds no MLflow store ({STORE}); pass a run's output folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    relocate_artifacts(args.output_dir)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri(args.output_dir)]
    command += ["--host", args.host, "--port", str(args.port)]
    print(f"open http://{args.host}:{args.port}", flush=True)
    os.execv(command[0], command)
    return 0  # not reached: exec replaces this process
