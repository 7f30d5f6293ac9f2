"""Every Slurm client command slurmvision runs itself (sacct, squeue, sinfo, scontrol, sbatch, scancel),
each with a timeout: a slurmctld that does not answer costs a ClusterError, never a hang. submitit
runs the training job's own sbatch. Torch-free.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Optional

from slurmvision.errors import ClusterError
from slurmvision.slurm.causes import SlurmAttempt

log = logging.getLogger(__name__)
# squeue's answer for a job it has forgotten (MinJobAge after its end): not queued, not unreachable.
FORGOTTEN = "Invalid job id specified"
# Slurm commands a job runs (job_state, requeue, job_end_time) may run in the time Slurm leaves after
# a signal: a slurmctld that does not answer must not keep the job until its SIGKILL (the checkpoint
# is saved by then; the coordinator resubmits).
SLURM_TIMEOUT_S = 10


def run_slurm_command(args: list[str], timeout: float = 30, env: Optional[dict] = None) -> str:
    """stdout of a Slurm client command, or a ClusterError that says how to reach the cluster."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise ClusterError(
            f"`{args[0]}` not found: run this on a Slurm login node, or start the local test cluster "
            "with `make slurm-up`"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"`{' '.join(args)}` did not answer in {timeout:.0f}s: is slurmctld up? (`make slurm-up` "
            "for the local cluster)"
        ) from None
    except OSError as err:
        raise ClusterError(f"`{args[0]}` could not run: {err}") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterError(
            f"`{' '.join(args)}` failed: {message[-1] if message else 'exit ' + str(result.returncode)}"
            " (for the local cluster: `make slurm-up`, then the `export SLURM_CONF=...` line it prints)"
        )
    return result.stdout


def sacct_attempts(job_id: str, timeout: float = 60) -> list[SlurmAttempt]:
    """Every attempt of a job, oldest first (`sacct -D` lists the requeued ones too)."""
    out = run_slurm_command(
        ["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "--format=State,NodeList,ExitCode"], timeout=timeout
    )
    return [SlurmAttempt.parse(line) for line in out.splitlines() if line.strip()]


def _squeue(job_id: str, *options: str) -> str:
    """squeue's answer about one job: empty if it is not listed or squeue has forgotten it; any
    other failure (a timeout, slurmctld down) raises ClusterError."""
    try:
        return run_slurm_command(["squeue", "-h", "-j", job_id, *options], timeout=60).strip()
    except ClusterError as err:
        if FORGOTTEN in str(err):
            return ""
        raise


def in_queue(job_id: str) -> bool:
    """Whether Slurm still holds the job (pending, running, or requeued after an end that
    sacct already shows, such as PREEMPTED)."""
    return bool(_squeue(job_id, "-o", "%i"))


def pending_nodes(job_id: str) -> Optional[int]:
    """How many nodes a pending job waits for; None if it is not pending."""
    out = _squeue(job_id, "-t", "PD", "-o", "%D").split()
    return int(out[0]) if out else None


def pending_order(timeout: float = 10) -> list[str]:
    """The pending jobs of the cluster, the next to start first."""
    return run_slurm_command(["squeue", "-h", "-t", "PD", "--sort=-p,i", "-o", "%i"], timeout=timeout).split()


def job_end_time(job_id: str) -> str:
    """When the job's time limit ends, in epoch seconds as squeue prints them ('' if it does not know)."""
    out = run_slurm_command(
        ["squeue", "-h", "-j", job_id, "-o", "%e"],
        timeout=SLURM_TIMEOUT_S,
        env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
    )  # whatever the user's format
    return out.splitlines()[0] if out else ""


def _sinfo_states(*selection: str) -> dict[str, str]:
    out = run_slurm_command(["sinfo", "-h", "-N", "-o", "%N %t", *selection], timeout=60)
    return dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) == 2)


def node_states(hosts: list[str]) -> dict[str, str]:
    """sinfo's compact state of each host (idle, mix, alloc, down*, drain, ...)."""
    return _sinfo_states("-n", ",".join(hosts))


def partition_node_states(partition: Optional[str]) -> dict[str, str]:
    """sinfo's compact state of every node of a partition (all nodes when None)."""
    return _sinfo_states(*(["-p", partition] if partition else []))


def partitions() -> str:
    """sinfo's partitions: `name|time limit|gres` lines."""
    return run_slurm_command(["sinfo", "--noheader", "--format=%P|%l|%G"])


def cluster_config() -> str:
    """`scontrol show config`: the cluster's settings as `Key = value` lines."""
    return run_slurm_command(["scontrol", "show", "config"])


def resize_pending(job_id: str, nodes: int, tasks: int) -> None:
    """A pending job's size: its node count and, with it, its task count (one set per node)."""
    run_slurm_command(["scontrol", "update", f"jobid={job_id}", f"NumNodes={nodes}", f"NumTasks={tasks}"], timeout=60)


def job_state(job_id: str) -> str:
    """The job's state as scontrol shows it; UNKNOWN when Slurm does not answer (logged, not raised: the
    training job asks in its grace time)."""
    try:
        words = run_slurm_command(["scontrol", "show", "job", job_id], timeout=SLURM_TIMEOUT_S).split()
    except ClusterError as err:
        log.error("%s", err)
        return "UNKNOWN"
    return next((word.split("=", 1)[1] for word in words if word.startswith("JobState=")), "UNKNOWN")


def requeue(job_id: str) -> bool:
    """`scontrol requeue`; whether Slurm took it (a failure is logged, not raised, as for job_state)."""
    try:
        run_slurm_command(["scontrol", "requeue", job_id], timeout=SLURM_TIMEOUT_S)
    except ClusterError as err:
        log.error("%s", err)
        return False
    return True


def scancel(job_ids: list[str]) -> None:
    run_slurm_command(["scancel", *job_ids])
