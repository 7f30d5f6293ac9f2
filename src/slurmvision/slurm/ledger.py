"""The run's ledger: one SQLite file (WAL) in the run directory, the record of every attempt.

Writers: `launch` and the coordinator (jobs, causes, decisions) and rank 0 of each attempt
(start, progress, end). Readers: `status` and the coordinator, also when Slurm's tools are
slow or down. An attempt is one start of a job: a job requeued by Slurm keeps its id and
counts up `restart` (SLURM_RESTART_COUNT). Torch-free: it runs on the login node.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)
LEDGER_NAME = "ledger.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    submitted REAL NOT NULL,
    cluster TEXT NOT NULL,
    reason TEXT NOT NULL,              -- launch, or the cause it resubmits after
    exclude TEXT NOT NULL DEFAULT '',  -- nodes kept out of this job
    handled INTEGER NOT NULL DEFAULT 0 -- the coordinator has acted on its end
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    restart INTEGER NOT NULL,          -- SLURM_RESTART_COUNT: 0, then 1 after each requeue
    nodes TEXT,
    world_size INTEGER,
    started REAL,
    ended REAL,
    step_start INTEGER,                -- the step it resumed from
    step_reached INTEGER,              -- the last step it finished (updated as it trains)
    step_saved INTEGER,                -- the last step it checkpointed
    step_time REAL,                    -- seconds per step, recently (for the ETA)
    checkpoint TEXT,                   -- the checkpoint it resumed from
    outcome TEXT,                      -- finished, stopped (on a signal), failed; NULL while running
    signal TEXT,
    error TEXT,
    cause TEXT,                        -- classified: see slurmvision.slurm.causes
    lost_steps INTEGER,                -- steps it trained that the next attempt had to redo
    PRIMARY KEY (job_id, restart)
);
CREATE TABLE IF NOT EXISTS events (
    time REAL NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Ledger:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LEDGER_NAME
        self._ready = False  # WAL mode and the tables, set up by this object's first connection

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per use: ranks and the coordinator are separate processes, often on
        # separate hosts; short transactions keep the file's lock free.
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=60000")
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")  # kept by the file from then on
                db.executescript(SCHEMA)
                self._ready = True
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def exists(self) -> bool:
        return self.path.is_file()

    # jobs (launch, coordinator)
    def add_job(self, job_id: str, cluster: str, reason: str = "launch", exclude: tuple[str, ...] = ()) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO jobs (job_id, submitted, cluster, reason, exclude) VALUES (?, ?, ?, ?, ?)",
                       (job_id, time.time(), cluster, reason, ",".join(exclude)))
            db.execute("INSERT INTO events VALUES (?, ?, ?)", (time.time(), "launch", f"job {job_id} submitted ({reason})"))

    def jobs(self) -> list[dict]:
        with self._db() as db:
            return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY submitted, rowid")]

    def mark_handled(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET handled = 1 WHERE job_id = ?", (job_id,))

    # attempts (rank 0 of each attempt)
    def attempt_started(self, job_id: str, restart: int, *, nodes: str, world_size: int, step: int,
                        checkpoint: Optional[str]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO attempts (job_id, restart, nodes, world_size, started, step_start, step_reached, "
                "step_saved, checkpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, restart, nodes, world_size, time.time(), step, step, step, checkpoint))
            # The attempt before this one (the same job requeued, or the previous job) lost
            # whatever it trained past the checkpoint this one resumes from.
            db.execute("UPDATE attempts SET lost_steps = MAX(0, step_reached - ?) WHERE lost_steps IS NULL AND "
                       "rowid = (SELECT rowid FROM attempts WHERE NOT (job_id = ? AND restart = ?) "
                       "ORDER BY started DESC LIMIT 1)", (step, job_id, restart))

    def attempt_progress(self, job_id: str, restart: int, *, step: int, saved: Optional[int] = None,
                         step_time: Optional[float] = None) -> None:
        with self._db() as db:
            db.execute("UPDATE attempts SET step_reached = MAX(step_reached, ?), step_time = COALESCE(?, step_time) "
                       "WHERE job_id = ? AND restart = ?", (step, step_time, job_id, restart))
            if saved is not None:
                db.execute("UPDATE attempts SET step_saved = ? WHERE job_id = ? AND restart = ?", (saved, job_id, restart))

    def attempt_ended(self, job_id: str, restart: int, *, outcome: str, step: int, signal: Optional[str] = None,
                      error: Optional[str] = None) -> None:
        with self._db() as db:
            db.execute("UPDATE attempts SET ended = ?, outcome = ?, step_reached = MAX(step_reached, ?), signal = ?, "
                       "error = ? WHERE job_id = ? AND restart = ?",
                       (time.time(), outcome, step, signal, error, job_id, restart))
            if outcome == "finished":
                db.execute("UPDATE attempts SET lost_steps = 0 WHERE job_id = ? AND restart = ?", (job_id, restart))

    def set_cause(self, job_id: str, restart: int, cause: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO attempts (job_id, restart) VALUES (?, ?)", (job_id, restart))
            db.execute("UPDATE attempts SET cause = ? WHERE job_id = ? AND restart = ?", (cause, job_id, restart))

    def attempts(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM attempts ORDER BY COALESCE(started, 1e300), rowid")
            return [dict(row) for row in rows]

    # events and coordinator state
    def event(self, source: str, message: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO events VALUES (?, ?, ?)", (time.time(), source, message))

    def events(self, limit: int = 20) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM events ORDER BY time DESC, rowid DESC LIMIT ?", (limit,))
            return [dict(row) for row in rows][::-1]

    def get(self, key: str, default=None):
        with self._db() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))


class AttemptRecorder:
    """What rank 0 of an attempt writes: its start, its progress (at most every
    `every_s` seconds, and at each checkpoint), and how it ended. A ledger that cannot be
    written (a full or read-only disk) costs a warning, never the training."""

    def __init__(self, run_dir: str | Path, job_id: Optional[str], restart: int, every_s: float = 2.0,
                 enabled: bool = True):
        import socket

        # Only rank 0 records; the other ranks hold a recorder that writes nothing.
        self.ledger = Ledger(run_dir) if enabled else None
        self.job_id = job_id or f"local-{int(time.time() * 1000)}"
        self.restart, self.every_s = restart, every_s
        self.nodes = os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
        self._last = 0.0

    def _write(self, method: str, **kwargs) -> None:
        if self.ledger is None:
            return
        try:
            getattr(self.ledger, method)(self.job_id, self.restart, **kwargs)
        except sqlite3.Error as err:
            log.warning("could not write the ledger %s: %s", self.ledger.path, err)

    def started(self, *, world_size: int, step: int, checkpoint: Optional[str]) -> None:
        self._write("attempt_started", nodes=self.nodes, world_size=world_size, step=step, checkpoint=checkpoint)

    def progress(self, step: int, step_time: Optional[float] = None, saved: Optional[int] = None) -> None:
        now = time.monotonic()
        if saved is not None or now - self._last >= self.every_s:
            self._last = now
            self._write("attempt_progress", step=step, saved=saved, step_time=step_time)

    def ended(self, outcome: str, step: int, signal: Optional[str] = None, error: Optional[str] = None) -> None:
        self._write("attempt_ended", outcome=outcome, step=step, signal=signal, error=error)

    def note(self, message: str) -> None:
        """An event of this attempt that `status` shows (for example a run that shrank)."""
        if self.ledger is None:
            return
        try:
            self.ledger.event("trainer", f"job {self.job_id}.{self.restart}: {message}")
        except sqlite3.Error as err:
            log.warning("could not write the ledger %s: %s", self.ledger.path, err)
