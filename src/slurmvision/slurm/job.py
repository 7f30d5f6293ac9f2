"""The callable submitit runs in every task: load the run's config, train, requeue if stopped.

It is pickled by reference on the login node, so this module must stay free of torch
imports; the trainer is imported when the job starts on the compute node.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
# The time-limit warning (`--signal`) means "save and come back": we requeue. SIGTERM comes
# from preemption (Slurm requeues by itself under PreemptMode=REQUEUE) or from a user's
# scancel (which must stay cancelled), so it is not requeued here.
REQUEUE_ON = ("SIGUSR1", "SIGUSR2")


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
            if os.environ.get("SLURM_PROCID") == "0" and result["signal"] in REQUEUE_ON:
                requeue(job_id)
            # No return value: submitit would take it as the job's final result, and the
            # requeued attempt is the one that finishes the run.
            raise SystemExit(0)
        return result
