"""What Slurm says of a job: its attempts from accounting, and whether it is still queued. Torch-free."""

from __future__ import annotations

from typing import Optional

from slurmvision.errors import ClusterError
from slurmvision.slurm.causes import SlurmAttempt
from slurmvision.slurm.executor import run_slurm_command

# squeue's answer for a job it has forgotten (MinJobAge after its end): not queued, not unreachable.
FORGOTTEN = "Invalid job id specified"


def sacct_attempts(job_id: str, timeout: float = 60) -> list[SlurmAttempt]:
    """Every attempt of a job, oldest first (`sacct -D` lists the requeued ones too)."""
    out = run_slurm_command(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "--format=State,NodeList,ExitCode"],
                            timeout=timeout)
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


def _sinfo_states(*selection: str) -> dict[str, str]:
    out = run_slurm_command(["sinfo", "-h", "-N", "-o", "%N %t", *selection], timeout=60)
    return dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) == 2)


def node_states(hosts: list[str]) -> dict[str, str]:
    """sinfo's compact state of each host (idle, mix, alloc, down*, drain, ...)."""
    return _sinfo_states("-n", ",".join(hosts))


def partition_node_states(partition: Optional[str]) -> dict[str, str]:
    """sinfo's compact state of every node of a partition (all nodes when None)."""
    return _sinfo_states(*(["-p", partition] if partition else []))


def resize_pending(job_id: str, nodes: int, tasks: int) -> None:
    """A pending job's size: its node count and, with it, its task count (one set per node)."""
    run_slurm_command(["scontrol", "update", f"jobid={job_id}", f"NumNodes={nodes}", f"NumTasks={tasks}"], timeout=60)
