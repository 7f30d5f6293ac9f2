"""submitit executors from a cluster profile, and the sbatch script a launch would submit.

With `cluster.container`, the tasks run in the image: pyxis through srun's `--container-image`
and `--container-mounts`, Apptainer/Singularity as the tasks' interpreter (`apptainer exec --nv
--bind ... IMAGE python3`, submitit's `python=`). The batch script itself, the run-directory
check of each attempt and the watcher job stay on the host: they call Slurm's commands, which
images seldom carry, and need no GPU. Every task runs with HF_HUB_OFFLINE=1: the ranks never
download pretrained weights (slurmvision.pretrained fetches them on the login node).

Login-node code: imports submitit, never torch.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

from slurmvision.configs.cluster import ClusterConfig, mounted

# The ranks load pretrained weights from files fetched before submission, never from the network.
OFFLINE = "--export=ALL,HF_HUB_OFFLINE=1"


def python_command(cluster: ClusterConfig) -> str:
    """The compute nodes' interpreter on the host (cluster.python, default this one), without the working
    directory on its module path (-P): a job starts in the directory it was submitted from, where anyone
    with write access could plant a module."""
    return f"{shlex.quote(cluster.python or sys.executable)} -P"


def _mounts(cluster: ClusterConfig, run_dirs: Iterable[Path]) -> list[str]:
    """The profile's mounts, and each run directory where the job finds it: at its real path (the trainer
    resolves it) and, if a symlink leads there, at the path submitit was given."""
    mounts = list(cluster.container.mounts)
    for run_dir in run_dirs:
        real, given = os.path.realpath(run_dir), os.path.abspath(run_dir)
        for path in dict.fromkeys([real, given]):
            if not mounted(path, mounts):
                mounts.append(real if path == real else f"{real}:{path}")
    return mounts


def task_command(cluster: ClusterConfig, run_dirs: Iterable[Path]) -> tuple[str, list[str]]:
    """(the tasks' python command, srun options that put them in the container)."""
    container = cluster.container
    if not container.runtime:
        return python_command(cluster), []
    mounts = _mounts(cluster, run_dirs)
    python = f"{shlex.quote(container.python)} -P"
    if container.runtime == "pyxis":
        return python, [
            f"--container-image={container.image}",
            f"--container-mounts={','.join(mounts)}",
            *container.args,
        ]
    gpus = ["--nv"] if cluster.gpus_per_node else []
    runtime = [container.runtime, "exec", *gpus, "--bind", ",".join(mounts), *container.args, container.image]
    return f"{shlex.join(runtime)} {python}", []


def slurm_parameters(
    cluster: ClusterConfig, run_dir: Path, job_name: str, comment: str, also_check: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per GPU, requeue allowed, signal before the limit.
    `also_check`: run directories each attempt checks besides `run_dir` (a sweep's runs, in one job array)."""
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
        "srun_args": ["--kill-on-bad-exit=1", OFFLINE, *task_command(cluster, (run_dir, *also_check))[1]],
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
    for folder in (run_dir, *also_check):
        setup.append(f"{python_command(cluster)} -m slurmvision.slurm.rundir {shlex.quote(str(folder))} || exit 3")
    params["setup"] = setup
    if cluster.signal != "USR2":  # submitit writes --signal=USR2@delay; replace the signal name
        params["additional_parameters"]["signal"] = f"{cluster.signal}@{cluster.signal_delay_s}"
    return params


def make_executor(cluster: ClusterConfig, folder: Path, job_name: str, comment: str, also_check: tuple[Path, ...] = ()):
    import submitit

    if cluster.executor == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(tasks_per_node=cluster.tasks_per_node, nodes=1, timeout_min=cluster.time_min)
        return executor
    python = task_command(cluster, (folder.parent, *also_check))[0]
    executor = submitit.SlurmExecutor(folder=str(folder), python=python)
    executor.update_parameters(**slurm_parameters(cluster, folder.parent, job_name, comment, also_check))
    return executor


def sbatch_script(cluster: ClusterConfig, folder: Path, job_name: str, comment: str) -> str:
    """The script `launch` would submit (for --dry-run), as submitit writes it."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = task_command(cluster, (folder.parent,))[0]
    command = " ".join([python, "-u", "-m", "submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(
        command=command, folder=str(folder), **slurm_parameters(cluster, folder.parent, job_name, comment)
    )
