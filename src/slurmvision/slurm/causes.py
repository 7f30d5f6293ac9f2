"""Why an attempt ended, from what rank 0 recorded and what Slurm's accounting says.

Pure functions (no Slurm calls) so every rule is unit-tested. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FINISHED, TIME_LIMIT, PREEMPTION, REQUEUE = "finished", "time limit", "preemption", "requeue"
USER_CANCEL, NODE_FAILURE, OOM, CRASH, UNKNOWN = "user cancel", "node failure", "oom", "crash", "unknown"

# sacct states of an attempt that is still queued or running.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
OOM_MARKS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "oom-kill", "oom_kill")
# The trainer's own stop when the next step would not finish before the time limit.
LIMIT_AHEAD = "time limit ahead"
# Stops that mean "save and come back": the time-limit warning (`--signal`), or the above.
WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2", LIMIT_AHEAD)


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


def classify(attempt: Optional[dict], slurm: Optional[SlurmAttempt], log_tail: str = "") -> str:
    """The cause of an attempt's end.

    `attempt` is rank 0's ledger row (None if the job died before training started), `slurm`
    the accounting row (None when Slurm's tools are unavailable or for local runs),
    `log_tail` the end of the job's error log.
    """
    outcome = (attempt or {}).get("outcome")
    signal = (attempt or {}).get("signal")
    error = (attempt or {}).get("error") or ""
    state = slurm.state if slurm else ""
    if outcome == "finished":
        return FINISHED
    if state == "OUT_OF_MEMORY" or any(mark in error or mark in log_tail for mark in OOM_MARKS):
        return OOM
    if state == "NODE_FAIL":
        return NODE_FAILURE
    if state == "PREEMPTED":
        return PREEMPTION
    if state == "TIMEOUT" or outcome == "stopped" and signal in WARNING_SIGNALS:
        return TIME_LIMIT
    if state == "REQUEUED":  # preemption shows as PREEMPTED: this is someone's `scontrol requeue`
        return REQUEUE
    if state == "CANCELLED" or outcome == "stopped" and signal in ("SIGTERM", "SIGINT"):
        return USER_CANCEL
    if outcome == "failed" or state == "FAILED":
        return CRASH
    return UNKNOWN
