"""Tracking that survives its server: every MLflow call of a run goes through an outbox that a background thread
sends, so training never waits on the tracking server and never dies of it.

    outbox = Outbox(send, OUTPUT_DIR)          # send(record) performs one MLflow call; records are JSON-able
    outbox.put({"op": "metrics", "step": 10, "timestamp": ms, "values": {"train/loss": 0.7}})
    outbox.close(timeout_s=60)                 # True: everything was sent; False: some is kept on disk

While the server answers, records are sent in order as they come. When a call
fails, the outbox keeps that record and every later one in
OUTPUT_DIR/mlflow_unsent/records.jsonl (files such as figures beside it), up to
`max_bytes`, and retries the oldest one every `retry_s` seconds; once the server
answers again, the kept records are sent in their order and the file is
emptied. A run that ends while the server is still away leaves its records there,
with a note in OUTPUT_DIR/mlflow_unsent/README.txt and in the log; `egmf-mlflow-sync
OUTPUT_DIR` (egmf.tracking.sync_main) sends them when the server is back, the
run's end status included.

Only the sender thread writes records.jsonl. When `close` times out while the
thread is still in a call, the record of that call and the queued ones go to
records_at_close.jsonl, after records.jsonl in order: a record whose call was
still running may then be sent twice (at least once, never lost). Only the standard library is used here: what a
record means to MLflow is egmf.tracking's (`record_sender`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("egmf.train")

UNSENT_DIR = "mlflow_unsent"
RECORDS = "records.jsonl"
RECORDS_AT_CLOSE = "records_at_close.jsonl"
"""What `close` took over from a sender thread still in a call; sent after RECORDS."""
NOTE = "README.txt"
TARGET = "target.json"
"""Where the kept records go: the tracking URI and the run id."""


class RecordRejected(Exception):
    """The server answered and refused the record (a bad value, say): it is dropped, not kept for later."""


class Outbox:
    def __init__(
        self,
        send: Callable[[dict], None],
        output_dir: str,
        target: dict | None = None,
        retry_s: float = 10.0,
        max_bytes: int = 256 * 2**20,
    ):
        self.send, self.retry_s, self.max_bytes = send, retry_s, max_bytes
        self.folder = os.path.join(output_dir, UNSENT_DIR)
        self.records_path = os.path.join(self.folder, RECORDS)
        self.target = target or {}
        self.lock = threading.Condition()
        """Guards `pending`, `in_flight`, `closing` and `abandoned`; held for local file writes, never for a call."""
        self.pending: deque[dict] = deque()
        self.in_flight: dict | None = None
        """The record the sender thread has taken and not yet sent or kept."""
        self.closing = False
        self.abandoned = False
        """Set by a `close` that timed out: the sender thread keeps nothing more."""
        self.away_since: float | None = None
        self.dropped = 0
        self.last_error = ""
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    # ---- the training thread's side -------------------------------------------------------------

    def put(self, record: dict) -> None:
        with self.lock:
            self.pending.append(record)
            self.lock.notify()

    def keep_file(self, path: str, name: str) -> str:
        """A stable copy of a file a record points at, for when the record waits on disk (figures are written to a
        temporary file; predictions folders may be rewritten before the server is back)."""
        folder = os.path.join(self.folder, "files", f"{time.time_ns()}")
        os.makedirs(folder)
        copy = os.path.join(folder, name)
        (shutil.copytree if os.path.isdir(path) else shutil.copyfile)(path, copy)
        return copy

    def close(self, timeout_s: float) -> bool:
        """Send what is queued, waiting at most `timeout_s`; True when nothing is left unsent."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(timeout_s)
        if self.thread.is_alive():  # still in a call: take over its record and the queue
            with self.lock:
                self.abandoned = True
                self.last_error = self.last_error or f"a call to it had not returned after {timeout_s:g} s"
                left = [self.in_flight] * (self.in_flight is not None) + list(self.pending)
                self.pending.clear()
                if left:
                    self._make_folder()
                    append_records(os.path.join(self.folder, RECORDS_AT_CLOSE), left)
        if self.unsent():
            self._write_note()
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        return True

    def unsent(self) -> int:
        with self.lock:
            queued = len(self.pending)
        return queued + sum(count_records(path) for path in kept_files(self.folder))

    # ---- the sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.pending and not self.closing:
                    self.lock.wait(self.retry_s if self.away_since else None)
                if self.abandoned:
                    return
                record = self.in_flight = self.pending.popleft() if self.pending else None
                closing = self.closing
            if record is not None and self.away_since is None:
                self._deliver(record)
            elif record is not None:
                self._keep(record)
            elif self.away_since:
                self._retry()
            if closing and record is None:
                return

    def _deliver(self, record: dict) -> None:
        try:
            self.send(record)
        except RecordRejected as exc:
            logger.warning("MLflow refused a %s record (%s); it is dropped", record["op"], exc)
        except Exception as exc:  # any failure of the tracking server: training must not notice
            self.away_since, self.last_error = time.time(), f"{type(exc).__name__}: {str(exc)[:300]}"
            logger.warning(
                "MLflow tracking is unreachable (%s); training goes on, and its records are kept in %s until the "
                "server answers again",
                self.last_error,
                self.records_path,
            )
            self._keep(record)
            return
        with self.lock:
            self.in_flight = None

    def _keep(self, record: dict) -> None:
        """Append the record taken to the kept ones, unless a `close` that timed out has taken it over."""
        with self.lock:
            self.in_flight = None
            if self.abandoned:
                return
            self._make_folder()
            line = json.dumps(record) + "\n"
            size = os.path.getsize(self.records_path) if os.path.exists(self.records_path) else 0
            if size + len(line) > self.max_bytes and record["op"] == "metrics":
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("%s is full (%d bytes): later metric records are dropped", self.records_path, size)
                return
            with open(self.records_path, "a") as f:
                f.write(line)

    def _retry(self) -> None:
        """Send the kept records in order; the server is back once all went through."""
        sent = send_records(self.records_path, self.send)
        if sent is None:
            return
        logger.warning("MLflow tracking answers again: %d kept record(s) sent", sent)
        self.away_since = None

    def _make_folder(self) -> None:
        """The folder of kept records, with where they go."""
        os.makedirs(self.folder, exist_ok=True)
        if not os.path.exists(os.path.join(self.folder, TARGET)):
            with open(os.path.join(self.folder, TARGET), "w") as f:
                json.dump(self.target, f)

    def _write_note(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        kept = sum(count_records(path) for path in kept_files(self.folder))
        note = (
            f"The MLflow tracking server was unreachable when this run ended ({self.last_error}).\n"
            f"{kept} record(s) are kept in {self.folder}"
            + (f" ({self.dropped} metric record(s) were dropped: the file was full)" if self.dropped else "")
            + f".\nWhen the server is back, send them with:\n\n    egmf-mlflow-sync {os.path.dirname(self.folder)}\n"
        )
        with open(os.path.join(self.folder, NOTE), "w") as f:
            f.write(note)
        logger.warning("%s", note.strip())


def kept_files(folder: str) -> list[str]:
    """The files of kept records in a run's mlflow_unsent folder that exist, in the order they are to be sent."""
    paths = [os.path.join(folder, name) for name in (RECORDS, RECORDS_AT_CLOSE)]
    return [path for path in paths if os.path.exists(path)]


def append_records(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def count_records(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def send_records(path: str, send: Callable[[dict], None]) -> int | None:
    """Send a file of kept records in order, rewriting it with what is left when a call fails: the number sent
    (the file then removed), or None if some are left."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for index, record in enumerate(records):
        try:
            send(record)
        except RecordRejected as exc:
            logger.warning("MLflow refused a kept %s record (%s); it is dropped", record["op"], exc)
        except Exception:
            left = "".join(json.dumps(r) + "\n" for r in records[index:])
            with open(path + ".partial", "w") as f:
                f.write(left)
            os.replace(path + ".partial", path)
            return None
    os.remove(path)
    return len(records)
