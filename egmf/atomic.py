"""Files and folders that are complete or absent, never half-written.

    write_atomically(path, data)           # a file: written beside, fsynced, renamed over
    write_json(path, value)
    with building(folder) as partial:      # a folder: built as .partial-NAME, swapped in whole on success
        ...write into partial...

A reader (a resumed job, the loader, a user) therefore never sees a truncated
file or a folder with some of its files: a crash leaves the old version, or a
`.partial-*` folder that nothing points to and the next build removes.
Shards, checkpoints, the best model, tracking records and evaluation results
are all written through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

PARTIAL_PREFIX = ".partial-"


def write_atomically(path: str, data: bytes) -> None:
    """Write beside `path` under a name of this writer's own, then rename over it: writers racing for one path
    (two array tasks writing one report) each publish a whole file, and the last rename wins."""
    folder, name = os.path.split(os.path.abspath(path))
    descriptor, partial = tempfile.mkstemp(prefix=f"{name}.partial-", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)  # mkstemp makes it private; the file is as readable as any other output
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def write_json(path: str, value: object) -> None:
    write_atomically(path, json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8"))


def partial_folder(final: str) -> str:
    """Where `final` is built: a hidden sibling, so a listing of the parent never mistakes it for the real one."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, PARTIAL_PREFIX + name)


def start_partial(final: str) -> str:
    """An empty build folder for `final` (whatever an interrupted earlier build left there is removed)."""
    partial = partial_folder(final)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


def publish(partial: str, final: str) -> None:
    """Swap a complete build folder in for `final`. The old version is moved aside first and removed only once
    the new one is in place, so at every moment `final` is either the old complete folder or the new one."""
    parent, name = os.path.split(os.path.normpath(final))
    old = os.path.join(parent, ".old-" + name)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(final: str) -> Iterator[str]:
    """Build a folder in one process: yields the partial folder; published on success, removed on error."""
    partial = start_partial(final)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, final)


def remove_partials(parent: str) -> None:
    """Remove the build folders that interrupted builds left under `parent`."""
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
