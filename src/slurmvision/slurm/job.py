"""The callable submitit runs in every task: load the run's config, train, requeue if stopped.

It is pickled by reference on the login node, so this module must stay free of torch
imports; the trainer is imported when the job starts on the compute node.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)
# The time-limit warning (`--signal`) means "save and come back": we requeue. SIGTERM comes
# from preemption (Slurm requeues the job when it ends it after the grace time, under
# PreemptMode=REQUEUE), `scontrol requeue`, or a user's scancel (which must stay
# cancelled): after saving we wait for Slurm to end the job, so that Slurm, which knows
# which it was, decides. A job that exited by itself would count as completed.
REQUEUE_ON = ("SIGUSR1", "SIGUSR2")
SIGTERM_WAIT_S = 600  # longer than any grace time or KillWait; then exit anyway


def requeue(job_id: str) -> bool:
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
    return result.returncode == 0


class TrainJob:
    def __init__(self, run_dir: str):
        self.run_dir = str(Path(run_dir).resolve())

    def __call__(self) -> dict:
        from slurmvision.configs import load_saved_config
        from slurmvision.trainer.loop import train

        result = train(load_saved_config(self.run_dir))
        job_id = os.environ.get("SLURM_JOB_ID")
        if result.get("interrupted") and job_id and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            if result["signal"] in REQUEUE_ON:
                if os.environ.get("SLURM_PROCID") == "0":
                    requeue(job_id)
            else:
                # Slurm shows a job in its preemption grace time as RUNNING, like a cancelled one.
                log.warning("checkpoint saved; waiting for Slurm to end job %s (a preempted job is requeued)", job_id)
                time.sleep(SIGTERM_WAIT_S)
            # No return value: submitit would take it as the job's final result, and the
            # requeued attempt is the one that finishes the run.
            raise SystemExit(0)
        return result
