"""submitit executors from a cluster profile, and the sbatch script a launch would submit.

Login-node code: imports submitit, never torch.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from slurmvision.configs.schema import ClusterConfig
from slurmvision.errors import ClusterError


def python_command() -> str:
    """This interpreter, without the working directory on its module path (-P): a job starts in the
    directory it was submitted from, where anyone with write access could plant a module."""
    return f"{shlex.quote(sys.executable)} -P"


def slurm_parameters(cluster: ClusterConfig, run_dir: Path, job_name: str, comment: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per GPU, requeue allowed, signal before the limit."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "comment": comment,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
        "stderr_to_stdout": False,
        "additional_parameters": {"requeue": True, **cluster.additional},
        # A rank that dies takes the others with it: without this they could wait in a
        # collective until the time limit.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb is not None:
        params["mem"] = f"{int(cluster.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    setup = list(cluster.setup)
    if cluster.elastic:
        # A job resized while it waited keeps the task count of its submission in its environment,
        # and srun would start that many tasks on the nodes it has: one set per node instead.
        tasks = f"$((SLURM_JOB_NUM_NODES * {cluster.tasks_per_node}))"
        setup.append(f"export SLURM_NTASKS={tasks} SLURM_NPROCS={tasks}")
    # Each attempt (a requeue runs this script again) checks that no one else could have written
    # the run directory before submitit unpickles the job from it (slurmvision.slurm.rundir).
    setup.append(f"{python_command()} -m slurmvision.slurm.rundir {shlex.quote(str(run_dir))} || exit 3")
    params["setup"] = setup
    if cluster.signal != "USR2":  # submitit writes --signal=USR2@delay; replace the signal name
        params["additional_parameters"]["signal"] = f"{cluster.signal}@{cluster.signal_delay_s}"
    return params


def make_executor(cluster: ClusterConfig, folder: Path, job_name: str, comment: str):
    import submitit

    if cluster.executor == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(tasks_per_node=cluster.tasks_per_node, nodes=1, timeout_min=cluster.time_min)
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder), python=python_command())
    executor.update_parameters(**slurm_parameters(cluster, folder.parent, job_name, comment))
    return executor


def sbatch_script(cluster: ClusterConfig, folder: Path, job_name: str, comment: str) -> str:
    """The script `launch` would submit (for --dry-run), as submitit writes it."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([python_command(), "-u", "-m", "submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder),
                               **slurm_parameters(cluster, folder.parent, job_name, comment))


def run_slurm_command(args: list[str], timeout: float = 30) -> str:
    """stdout of a Slurm client command, or a ClusterError that says how to reach the cluster."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"`{args[0]}` not found: run this on a Slurm login node, or start the local test cluster with `make slurm-up`") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(args)}` did not answer in {timeout:.0f}s: is slurmctld up? (`make slurm-up` for the local cluster)") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterError(f"`{' '.join(args)}` failed: {message[-1] if message else 'exit ' + str(result.returncode)}"
                           " (for the local cluster: `make slurm-up`, then the `export SLURM_CONF=...` line it prints)")
    return result.stdout
