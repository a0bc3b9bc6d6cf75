"""Failure markers: how a run's status survives the process that failed.

    OUTPUT_DIR/failures/rank{R}.txt    node name, then the traceback of the rank that raised (a rank whose
                                       collective broke because a peer went away says so on its last line)

When one rank fails, the launcher stops the others with SIGTERM. Rank 0 then
sees a stop, not an error, and would end the MLflow run KILLED; the marker
tells it the run FAILED. When rank 0 itself was killed outright, the job
script ends the run with `--close-run=FAILED` and the markers' last lines
become the run's `failure` tag. A rank that ends by a stop signal leaves
OUTPUT_DIR/stops/rank{R}, so that a peer whose collective breaks as it exits
can tell a stop from a rank killed outright. Markers are cleared when a run
starts.
"""

from __future__ import annotations

import os
import shutil

from egmf.distributed import WorldInfo, node_name

FAILURES = "failures"
STOPS = "stops"
"""OUTPUT_DIR/stops/rank{R}: ranks that ended by a stop signal (empty files)."""


def write_failure(output_dir: str, world: WorldInfo, text: str) -> None:
    """Leave a marker so rank 0, stopped by the launcher after this rank failed, ends the run FAILED, not KILLED."""
    folder = os.path.join(output_dir, FAILURES)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{world.rank}.txt"), "w") as f:
        f.write(f"{node_name()}\n{text}")


def write_stop(output_dir: str, world: WorldInfo) -> None:
    """Mark that this rank ended by a stop signal: a peer whose collective then breaks on it knows the rank went
    away by the stop, not killed outright."""
    folder = os.path.join(output_dir, STOPS)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"rank{world.rank}"), "w").close()


def all_peers_stopped(output_dir: str, world: WorldInfo) -> bool:
    folder = os.path.join(output_dir, STOPS)
    peers = [rank for rank in range(world.world_size) if rank != world.rank]
    return all(os.path.exists(os.path.join(folder, f"rank{rank}")) for rank in peers)


def failed_ranks(output_dir: str) -> list[str]:
    folder = os.path.join(output_dir, FAILURES)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def clear_failures(output_dir: str) -> None:
    for folder in (FAILURES, STOPS):
        shutil.rmtree(os.path.join(output_dir, folder), ignore_errors=True)


def failure_notes(output_dir: str) -> str:
    """The last line of each rank's marker (the exception, usually), one line per rank."""
    notes = []
    for name in failed_ranks(output_dir):
        with open(os.path.join(output_dir, FAILURES, name)) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        notes.append(f"{name}: {lines[-1] if lines else ''}")
    return "\n".join(notes)
