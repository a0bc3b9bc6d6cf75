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
run's end status included. Only the standard library is used here: what a
record means to MLflow is egmf.tracking's (`record_sender`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("egmf.train")

UNSENT_DIR = "mlflow_unsent"
RECORDS = "records.jsonl"
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
        self.pending: queue.Queue = queue.Queue()
        self.away_since: float | None = None
        self.dropped = 0
        self.last_error = ""
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    # ---- the training thread's side -------------------------------------------------------------

    def put(self, record: dict) -> None:
        self.pending.put(record)

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
        self.pending.put(None)
        self.thread.join(timeout_s)
        if self.thread.is_alive() or self.unsent():
            self._write_note()
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        return True

    def unsent(self) -> int:
        return self.pending.qsize() + count_records(self.records_path)

    # ---- the sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                record = self.pending.get(timeout=self.retry_s if self.away_since else None)
            except queue.Empty:
                self._retry()
                continue
            if record is None:
                if self.away_since:
                    self._retry()
                return
            if self.away_since is None:
                self._deliver(record)
            else:
                self._keep(record)

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

    def _keep(self, record: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if not os.path.exists(os.path.join(self.folder, TARGET)):
            with open(os.path.join(self.folder, TARGET), "w") as f:
                json.dump(self.target, f)
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

    def _write_note(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        while True:  # whatever is still queued joins the kept records
            try:
                record = self.pending.get_nowait()
            except queue.Empty:
                break
            if record is not None:
                self._keep(record)
        note = (
            f"The MLflow tracking server was unreachable when this run ended ({self.last_error}).\n"
            f"{count_records(self.records_path)} record(s) are kept in {self.records_path}"
            + (f" ({self.dropped} metric record(s) were dropped: the file was full)" if self.dropped else "")
            + f".\nWhen the server is back, send them with:\n\n    egmf-mlflow-sync {os.path.dirname(self.folder)}\n"
        )
        with open(os.path.join(self.folder, NOTE), "w") as f:
            f.write(note)
        logger.warning("%s", note.strip())


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
