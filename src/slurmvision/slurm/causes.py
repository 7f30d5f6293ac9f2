"""Why an attempt ended, from what rank 0 recorded and what Slurm's accounting says.

Pure functions (no Slurm calls) so every rule is unit-tested. Torch-free: the login node reads
these enums too. Their values are what the ledger files hold, so older ledgers still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Optional


class Outcome(StrEnum):
    """How rank 0 says an attempt ended."""

    FINISHED = "finished"
    STOPPED = "stopped"  # by a signal or before the time limit: saved, to be resumed
    FAILED = "failed"


class StopReason(StrEnum):
    """Why a stopped attempt stopped: the signal every rank agreed on, or the trainer's own stop."""

    SIGUSR1 = "SIGUSR1"
    SIGUSR2 = "SIGUSR2"
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"
    # The trainer's own stop when the next step would not finish before the time limit.
    LIMIT_AHEAD = "time limit ahead"


class Cause(StrEnum):
    """Why an attempt ended, all facts considered (`classify`)."""

    FINISHED = "finished"
    TIME_LIMIT = "time limit"
    PREEMPTION = "preemption"
    REQUEUE = "requeue"
    USER_CANCEL = "user cancel"
    NODE_FAILURE = "node failure"
    OOM = "oom"
    CRASH = "crash"
    UNKNOWN = "unknown"


# sacct states of an attempt that is still queued or running.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "RESIZING",
    "STAGE_OUT",
    "SIGNALING",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
}
OOM_MARKS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "oom-kill", "oom_kill")
# Stops that mean "save and come back": the time-limit warning (`--signal`), or the trainer's own.
WARNING_SIGNALS = (StopReason.SIGUSR1, StopReason.SIGUSR2, StopReason.LIMIT_AHEAD)


@dataclass(frozen=True)
class SlurmAttempt:
    """One row of `sacct -D -X`: an attempt of a job (a requeued job has several)."""

    state: str  # the first word: "CANCELLED by 0" -> CANCELLED
    nodes: str
    exit_code: str

    @classmethod
    def parse(cls, line: str) -> "SlurmAttempt":
        state, nodes, exit_code = (line.split("|") + ["", ""])[:3]
        return cls(state.split()[0].upper() if state.strip() else "UNKNOWN", nodes.strip(), exit_code.strip())

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def classify(attempt: Optional[dict], slurm: Optional[SlurmAttempt], log_tail: str = "") -> Cause:
    """The cause of an attempt's end.

    `attempt` is rank 0's ledger row (None if the job died before training started), `slurm`
    the accounting row (None when Slurm's tools are unavailable or for local runs),
    `log_tail` the end of the job's error log.
    """
    outcome = (attempt or {}).get("outcome")
    signal = (attempt or {}).get("signal")
    error = (attempt or {}).get("error") or ""
    state = slurm.state if slurm else ""
    if outcome == Outcome.FINISHED:
        return Cause.FINISHED
    if state == "OUT_OF_MEMORY" or any(mark in error or mark in log_tail for mark in OOM_MARKS):
        return Cause.OOM
    if state == "NODE_FAIL":
        return Cause.NODE_FAILURE
    if state == "PREEMPTED":
        return Cause.PREEMPTION
    if state == "TIMEOUT" or outcome == Outcome.STOPPED and signal in WARNING_SIGNALS:
        return Cause.TIME_LIMIT
    if state == "REQUEUED":  # preemption shows as PREEMPTED: this is someone's `scontrol requeue`
        return Cause.REQUEUE
    if state == "FAILED" and outcome == Outcome.STOPPED:
        # The ranks saved on a SIGTERM from slurmstepd, but no scancel, limit, preemption or requeue
        # sent it: the step was torn down (its srun killed, another task gone): resubmitted as a crash.
        return Cause.CRASH
    if state == "CANCELLED" or outcome == Outcome.STOPPED and signal in (StopReason.SIGTERM, StopReason.SIGINT):
        return Cause.USER_CANCEL
    if outcome == Outcome.FAILED or state == "FAILED":
        return Cause.CRASH
    return Cause.UNKNOWN
