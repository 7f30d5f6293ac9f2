"""The run's ledger: the record of every job and attempt, as append-only files in RUN/ledger/.

Writers: `launch`, `cancel` and the coordinator (jobs, causes, decisions), on the login node or
in a watcher job, and rank 0 of each attempt (start, progress, end) on a compute node. Run
directories live on NFS, Lustre or GPFS, where a database shared between hosts is not safe
(SQLite's WAL needs all its users on one host) and appends from two hosts to one file can
interleave. So every writing process appends to a file of its own, one JSON record per line,
each written whole, fsynced and closed (NFS's close-to-open consistency then shows it to other
hosts). Readers fold all files into the tables below, ordered by time; a torn last line (a
writer killed mid-record) is skipped, a corrupt line is skipped with one warning, and a lost
ledger leaves `status` with what the checkpoints say.

An attempt is one start of a job: a job requeued by Slurm keeps its id and counts up
`restart` (SLURM_RESTART_COUNT). A job id Slurm hands out again (after its database was
reset) is a new job: attempts belong to the newest job of that id submitted before them.
Torch-free: it runs on the login node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Optional

from slurmvision.slurm.causes import Outcome, StopReason

log = logging.getLogger(__name__)
LEDGER_DIR = "ledger"
ATTEMPT_FIELDS = (
    "job_id",
    "restart",
    "nodes",
    "world_size",
    "started",
    "ended",
    "step_start",
    "step_reached",
    "step_saved",
    "step_time",
    "checkpoint",
    "outcome",
    "signal",
    "error",
    "cause",
    "lost_steps",
    "last_seen",  # the time of rank 0's newest record of the attempt: when it was last heard of alive
)
_warned: set[tuple[str, int]] = set()  # corrupt lines already reported by this process


class Ledger:
    """Reads the whole ledger; writes to this process's own file, named after `writer`."""

    def __init__(self, run_dir: str | Path, writer: str = "cli"):
        self.dir = Path(run_dir) / LEDGER_DIR
        self.writer = re.sub(r"[^\w.-]", "_", writer)
        self._file: Optional[Path] = None
        self._cache: tuple[Any, Optional[_Tables]] = (None, None)

    def exists(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("*.jsonl"))

    # writing
    def _append(self, op: str, **fields) -> None:
        if self._file is None:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            self._file = self.dir / f"{self.writer}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}.jsonl"
        record = json.dumps({"t": time.time(), "op": op, **fields}, separators=(",", ":")) + "\n"
        fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, record.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def add_job(self, job_id: str, cluster: str, reason: str = "launch", exclude: tuple[str, ...] = ()) -> None:
        self._append("job", job_id=job_id, cluster=cluster, reason=reason, exclude=",".join(exclude))
        self.event("launch", f"job {job_id} submitted ({reason})")

    def mark_handled(self, job_id: str) -> None:
        self._append("handled", job_id=job_id)

    def attempt_started(
        self, job_id: str, restart: int, *, nodes: str, world_size: int, step: int, checkpoint: Optional[str]
    ) -> None:
        self._append(
            "started",
            job_id=job_id,
            restart=restart,
            nodes=nodes,
            world_size=world_size,
            step=step,
            checkpoint=checkpoint,
        )

    def attempt_progress(
        self, job_id: str, restart: int, *, step: int, saved: Optional[int] = None, step_time: Optional[float] = None
    ) -> None:
        self._append("progress", job_id=job_id, restart=restart, step=step, saved=saved, step_time=step_time)

    def attempt_ended(
        self,
        job_id: str,
        restart: int,
        *,
        outcome: Outcome,
        step: int,
        signal: Optional[StopReason] = None,
        error: Optional[str] = None,
    ) -> None:
        self._append("ended", job_id=job_id, restart=restart, outcome=outcome, step=step, signal=signal, error=error)

    def set_cause(self, job_id: str, restart: int, cause: str) -> None:
        self._append("cause", job_id=job_id, restart=restart, cause=cause)

    def event(self, source: str, message: str) -> None:
        self._append("event", source=source, message=message)

    def put(self, key: str, value) -> None:
        self._append("put", key=key, value=value)

    # reading
    def jobs(self) -> list[dict]:
        return [dict(job) for job in self._tables().jobs]

    def attempts(self) -> list[dict]:
        attempts = self._tables().attempts.values()
        ordered = sorted(attempts, key=lambda a: a["started"] if a["started"] is not None else float("inf"))
        return [{k: a[k] for k in ATTEMPT_FIELDS} for a in ordered]

    def events(self, limit: int = 20) -> list[dict]:
        return [dict(event) for event in self._tables().events[-limit:]]

    def get(self, key: str, default=None):
        return self._tables().meta.get(key, default)

    def _tables(self) -> "_Tables":
        files = sorted(self.dir.glob("*.jsonl"), key=lambda path: path.name) if self.dir.is_dir() else []
        signature = [(path.name, *_size_and_mtime(path)) for path in files]
        if self._cache[0] != signature:
            self._cache = (signature, _Tables(_read_records(files)))
        return self._cache[1]


def _size_and_mtime(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    except FileNotFoundError:
        return -1, -1


def _read_records(files: list[Path]) -> list[dict]:
    """Every whole record of every file, oldest first. The last line of a file without its
    newline is a record still being written (or torn by a kill): not a record yet."""
    records = []
    for path in files:
        try:
            lines = path.read_bytes().split(b"\n")[:-1]
        except FileNotFoundError:
            continue
        whole = _decode_all(lines)
        if whole is not None:  # the usual case: every line a record, decoded in one go
            records.extend(whole)
            continue
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("t"), (int, float)):
                    raise ValueError("not a ledger record")
            except ValueError as err:
                if (str(path), number) not in _warned:
                    _warned.add((str(path), number))
                    log.warning("ledger file %s, line %d is corrupt (%s): skipped", path, number, err)
                continue
            records.append(record)
    records.sort(key=lambda r: r["t"])  # stable: a file's own records keep their order
    return records


def _decode_all(lines: list[bytes]) -> Optional[list[dict]]:
    """The lines' records as one JSON array (a long ledger decodes several times faster than line by
    line); None if any line is not one whole record, for the line-by-line pass that says which."""
    try:
        decoded = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        return None
    whole = len(decoded) == len(lines) and all(
        isinstance(r, dict) and isinstance(r.get("t"), (int, float)) for r in decoded
    )
    return decoded if whole else None


class _Tables:
    """The ledger folded from its records: jobs, attempts, events and the coordinator's keys."""

    def __init__(self, records: list[dict]):
        self.jobs: list[dict] = []
        self.attempts: dict[tuple, dict] = {}
        self.events: list[dict] = []
        self.meta: dict[str, Any] = {}
        self._newest_job: dict[str, int] = {}  # job id -> index in self.jobs of its newest submission
        # The attempt started last, and the one started last before it (records come in time order):
        # `_started` finds the attempt before a start in constant time, so `status` stays flat in the
        # number of attempts.
        self._last_started: Optional[dict] = None
        self._started_before: Optional[dict] = None
        for record in records:
            try:
                getattr(self, f"_{record['op']}")(record)
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                log.warning("ledger record %s could not be read (%s): skipped", record, err)

    def _job(self, r: dict) -> None:
        self._newest_job[r["job_id"]] = len(self.jobs)
        self.jobs.append(
            {
                "job_id": r["job_id"],
                "submitted": r["t"],
                "cluster": r["cluster"],
                "reason": r["reason"],
                "exclude": r["exclude"],
                "handled": 0,
            }
        )

    def _handled(self, r: dict) -> None:
        if r["job_id"] in self._newest_job:
            self.jobs[self._newest_job[r["job_id"]]]["handled"] = 1

    def _attempt(self, r: dict) -> dict:
        key = (self._newest_job.get(r["job_id"]), r["job_id"], int(r["restart"]))
        if key not in self.attempts:
            self.attempts[key] = dict.fromkeys(ATTEMPT_FIELDS) | {"job_id": r["job_id"], "restart": int(r["restart"])}
        return self.attempts[key]

    def _started(self, r: dict) -> None:
        # The attempt before this one (the same job requeued, or the previous job) lost whatever
        # it trained past the checkpoint this one resumes from.
        attempt = self._attempt(r)
        if attempt is self._last_started:  # started again: the one before it stays the one before
            previous = self._started_before
        else:
            previous, self._started_before = self._last_started, self._last_started
        self._last_started = attempt
        if previous is not None and previous["lost_steps"] is None:
            previous["lost_steps"] = max(0, (previous["step_reached"] or 0) - r["step"])
        attempt.update(
            nodes=r["nodes"],
            world_size=r["world_size"],
            started=r["t"],
            ended=None,
            outcome=None,
            step_start=r["step"],
            step_reached=r["step"],
            step_saved=r["step"],
            checkpoint=r["checkpoint"],
            last_seen=r["t"],
        )

    def _progress(self, r: dict) -> None:
        attempt = self._attempt(r)
        attempt["step_reached"] = max(attempt["step_reached"] or 0, r["step"])
        attempt["last_seen"] = r["t"]
        if r.get("step_time") is not None:
            attempt["step_time"] = r["step_time"]
        if r.get("saved") is not None:
            attempt["step_saved"] = r["saved"]

    def _ended(self, r: dict) -> None:
        attempt = self._attempt(r)
        attempt.update(
            ended=r["t"],
            last_seen=r["t"],
            outcome=r["outcome"],
            signal=r["signal"],
            error=r["error"],
            step_reached=max(attempt["step_reached"] or 0, r["step"]),
        )
        if r["outcome"] == Outcome.FINISHED:
            attempt["lost_steps"] = 0

    def _cause(self, r: dict) -> None:
        self._attempt(r)["cause"] = r["cause"]

    def _event(self, r: dict) -> None:
        self.events.append({"time": r["t"], "source": r["source"], "message": r["message"]})

    def _put(self, r: dict) -> None:
        self.meta[r["key"]] = r["value"]


class AttemptRecorder:
    """What rank 0 of an attempt writes: its start, its progress (at most every
    `every_s` seconds, and at each checkpoint), and how it ended. A ledger that cannot be
    written (a full or read-only disk) costs a warning, never the training."""

    def __init__(
        self, run_dir: str | Path, job_id: Optional[str], restart: int, every_s: float = 5.0, enabled: bool = True
    ):
        self.job_id = job_id or f"local-{int(time.time() * 1000)}"
        # Only rank 0 records; the other ranks hold a recorder that writes nothing.
        self.ledger = Ledger(run_dir, writer=f"attempt-{self.job_id}.{restart}") if enabled else None
        self.restart, self.every_s = restart, every_s
        self.nodes = os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
        self._last = 0.0

    def _write(self, method: str, *args, **kwargs) -> None:
        if self.ledger is None:
            return
        try:
            getattr(self.ledger, method)(*args, **kwargs)
        except OSError as err:
            log.warning("could not write the ledger in %s: %s", self.ledger.dir, err)

    def started(self, *, world_size: int, step: int, checkpoint: Optional[str]) -> None:
        self._write(
            "attempt_started",
            self.job_id,
            self.restart,
            nodes=self.nodes,
            world_size=world_size,
            step=step,
            checkpoint=checkpoint,
        )

    def progress(self, step: int, step_time: Optional[float] = None, saved: Optional[int] = None) -> None:
        now = time.monotonic()
        if saved is not None or now - self._last >= self.every_s:
            self._last = now
            self._write("attempt_progress", self.job_id, self.restart, step=step, saved=saved, step_time=step_time)

    def ended(
        self, outcome: Outcome, step: int, signal: Optional[StopReason] = None, error: Optional[str] = None
    ) -> None:
        self._write("attempt_ended", self.job_id, self.restart, outcome=outcome, step=step, signal=signal, error=error)

    def note(self, message: str) -> None:
        """An event of this attempt that `status` shows (for example a run that shrank)."""
        self._write("event", "trainer", f"job {self.job_id}.{self.restart}: {message}")
