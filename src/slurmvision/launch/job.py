"""The callable submitit runs in every task: load the run's config, train, requeue if stopped.

It is pickled by reference on the login node, so this module must stay free of torch
imports; the trainer is imported when the job starts on the compute node.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from slurmvision.slurm.causes import WARNING_SIGNALS, Cause
from slurmvision.slurm.client import job_state, requeue

log = logging.getLogger(__name__)
# After saving on a signal, rank 0 requeues the job when Slurm would not bring it back by
# itself. The time-limit warning (`--signal`, USR1/USR2) means "save and come back". On
# SIGTERM the job's state tells why: a scancel, an `scontrol requeue` or the time limit
# has already ended the job (COMPLETING), and Slurm's decision stands; a job still RUNNING
# is being preempted (Slurm shows the grace time as RUNNING) and is requeued now, handing
# the nodes over at once. A preempted job that exited by itself would count as completed.


def slurm_job_id() -> str | None:
    """This job's id as submitit and the ledger name it: an array task (a sweep's run) is
    ARRAY_TASK, not the task's own numeric SLURM_JOB_ID."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class TrainJob:
    def __init__(self, run_dir: str):
        self.run_dir = str(Path(run_dir).resolve())

    def __call__(self) -> dict:
        from slurmvision.configs import load_saved_config
        from slurmvision.trainer.entry import train

        result = train(load_saved_config(self.run_dir))
        job_id = slurm_job_id()
        if result.get("interrupted") and job_id and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            if os.environ.get("SLURM_PROCID") == "0":
                self._come_back(job_id, result["signal"])
            # No return value: submitit would take it as the job's final result, and the
            # requeued attempt is the one that finishes the run.
            raise SystemExit(0)
        return result

    def _come_back(self, job_id: str, signal: str) -> None:
        # Asked after a warning too: a SIGTERM (an scancel) may have come after it, and a job Slurm
        # has ended stays ended.
        state = job_state(job_id)
        if state != "RUNNING":
            log.info("job %s is %s: Slurm has ended it, not requeueing", job_id, state)
            return
        if signal not in WARNING_SIGNALS:
            from slurmvision.slurm.ledger import Ledger

            # sacct will show REQUEUED: keep the cause that only this moment tells.
            restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
            Ledger(self.run_dir, writer="job").set_cause(job_id, restart, Cause.PREEMPTION)
        requeue(job_id)
