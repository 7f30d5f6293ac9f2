"""`slurmvision logs`: the log of one rank of one attempt, found from the run directory (no torch).

Where a run's logs are:
  RUN/slurm/JOB_RANK_log.err   submitit's: everything rank RANK of job JOB wrote to stderr (the
  RUN/slurm/JOB_RANK_log.out   trainer's log lines, tracebacks) and stdout (submitit's own lines);
                               a job Slurm requeues appends each attempt to the same two files
  RUN/logs/rank-NNNNN.log      the trainer's log lines of rank N, every attempt of every job
  RUN/logs/coordinator.log     the login-node coordinator (`launch --coordinate daemon`)
  RUN/logs/watcher-JOB.log     each watcher job (`--coordinate watcher`, the Slurm default)
  SWEEP/slurm/JOB_TASK_RANK_log.err, .out
                               submitit's, for a run a sweep started as task TASK of its job array
                               JOB (job JOB_TASK in the run's ledger); the run's later jobs (the
                               coordinator's resubmissions) have theirs in RUN/slurm/

An attempt is a ledger record (`job JOB.RESTART` in `status`). submitit writes `Starting with
JobEnvironment(...)` to the .out file each time a job starts, before the trainer runs: the attempt's
part of the .out file runs from its start line to the next, and of the .err file (or the rank log)
the lines whose timestamps fall in the same window. A line with no timestamp (a traceback) belongs
with the line above it.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional, TextIO

from slurmvision.errors import RunError
from slurmvision.slurm.ledger import Ledger

STREAMS = ("stderr", "stdout", "rank-log")
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
_START = "Starting with JobEnvironment"


@dataclass
class LogPart:
    """A log file, and the window of time (epoch seconds) of one attempt in it; None: the whole file."""

    path: Path
    since: Optional[float] = None
    until: Optional[float] = None
    title: str = ""


def find_attempt(run_dir: Path, which: Optional[str]) -> Optional[dict]:
    """The ledger's attempt: the newest (None), the K-th in time order (1, 2, ...; -1 the newest), or JOB.RESTART."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory: give a run directory (launch printed it)")
    ledger = Ledger(run_dir)
    attempts = ledger.attempts() if ledger.exists() else []
    if not attempts:
        if which is None:
            return None
        raise RunError(f"{run_dir} has no attempts in its ledger yet: drop --attempt")
    if which is None:
        return attempts[-1]
    names = [f"{a['job_id']}.{a['restart']}" for a in attempts]
    if which in names:
        return attempts[names.index(which)]
    k = int(which) if re.fullmatch(r"-?[1-9]\d*", which) else 0
    if 1 <= k <= len(attempts) or -len(attempts) <= k <= -1:
        return attempts[k - 1 if k > 0 else k]
    raise RunError(
        f"no attempt {which!r} in {run_dir}: give 1 to {len(attempts)} (-1 the newest) or one of "
        f"{', '.join(names)} (`slurmvision status {run_dir}` lists them)"
    )


def _stamp(line: str) -> Optional[float]:
    match = _STAMP.search(line[:64])
    if not match:
        return None
    try:
        return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return None


def _starts(out_file: Path) -> list[float]:
    """The start times of the job's attempts, from submitit's line in the .out file."""
    if not out_file.is_file():
        return []
    with open(out_file, errors="replace") as f:
        return [t for t in (_stamp(line) for line in f if _START in line) if t is not None]


def _window(starts: list[float], started: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """The attempt's window: from the last start at or before the ledger's `started` to the next start."""
    if started is None or not starts:
        return None, None
    before = [t for t in starts if t <= started + 1]
    since = before[-1] if before else starts[0]
    later = [t for t in starts if t > since]
    return since, later[0] if later else None


def log_part(run_dir: Path, *, rank: int = 0, attempt: Optional[dict] = None, stream: str = "stderr") -> LogPart:
    """The log of `rank` in `attempt` (a ledger record; None: the whole file of the newest job)."""
    rank_log = run_dir / "logs" / f"rank-{rank:05d}.log"
    job_id = attempt["job_id"] if attempt else _newest_job(run_dir)
    prefix = job_folder(run_dir, job_id) / f"{job_id}_{rank}_log"
    out, err = Path(f"{prefix}.out"), Path(f"{prefix}.err")
    since, until = _window(_starts(out), attempt["started"]) if attempt else (None, None)
    name = f"rank {rank}" + (f", attempt {attempt['job_id']}.{attempt['restart']}" if attempt else "")
    # A run trained by `slurmvision train`, without submitit, has only the rank logs.
    candidates = {"stderr": [err, rank_log], "stdout": [out], "rank-log": [rank_log]}[stream]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RunError(
            f"no log of {name} in {run_dir}: {' or '.join(map(str, candidates))} does not exist (yet?); "
            "ranks are numbered from 0, and a job's files appear when it starts"
        )
    return LogPart(path, since, until, f"==> {path} ({name}) <==")


def job_folder(run_dir: Path, job_id: Optional[str]) -> Path:
    """Where submitit keeps the files of the run's job `job_id`: RUN/slurm/, or SWEEP/slurm/ for the job
    array task a sweep started the run as."""
    from slurmvision.launch.sweep import array_task  # here: reading a log needs no config loading

    task = array_task(run_dir) if job_id else None
    return task[0] if task and task[1] == job_id else run_dir / "slurm"


def _newest_job(run_dir: Path) -> Optional[str]:
    ledger = Ledger(run_dir)
    jobs = ledger.jobs() if ledger.exists() else []
    return jobs[-1]["job_id"] if jobs else None


def lines_of(part: LogPart) -> Iterator[str]:
    """The lines of the part's window; for a .out file the window starts at submitit's start line."""
    keep = part.since is None
    with open(part.path, errors="replace") as f:
        for line in f:
            t = _stamp(line)
            if t is not None and part.since is not None:
                keep = part.since <= t and (part.until is None or t < part.until)
            if keep:
                yield line


def coordinator_parts(run_dir: Path) -> list[LogPart]:
    """The coordinator's log and the watcher jobs' logs, oldest first."""
    logs = run_dir / "logs"
    paths = [logs / "coordinator.log"] if (logs / "coordinator.log").is_file() else []
    paths += sorted(logs.glob("watcher-*.log"), key=lambda p: p.stat().st_mtime) if logs.is_dir() else []
    if not paths:
        raise RunError(f"{run_dir} has no coordinator or watcher log: it was coordinated by hand, not yet, or locally")
    return [LogPart(path, title=f"==> {path} <==") for path in paths]


def follow(path: Path, out: TextIO = sys.stdout, poll_s: float = 1.0, stop=None) -> None:
    """Print what is appended to `path` until interrupted (or `stop()` is true)."""
    with open(path, errors="replace") as f:
        f.seek(0, 2)
        while not (stop and stop()):
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
            else:
                time.sleep(poll_s)
