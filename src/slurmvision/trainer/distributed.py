"""Where this process sits in the job: one typed object, read from whatever launched it.

Sources, first match wins: submitit's `JobEnvironment` (Slurm or local executor), plain
Slurm `srun` variables, torchrun variables, or nothing (a single process).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, fields
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from slurmvision.errors import RunError
from slurmvision.slurm import hostlist

log = logging.getLogger(__name__)
Record = TypeVar("Record")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: Optional[str] = None
    restart_count: int = 0
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_for_job(job_id: str) -> int:
    """Same port on every node of a job, different between jobs sharing a node."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + digits % 20000


def started_as_a_rank() -> bool:
    """Whether torchrun or an `srun` step started this process as one rank of several (not a
    batch script, which sees its job's SLURM_NTASKS but is one process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return True
    return "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1


def from_environment() -> DistEnv:
    env = os.environ
    restart = int(env.get("SLURM_RESTART_COUNT", 0))
    if "SUBMITIT_EXECUTOR" in env or "SUBMITIT_FOLDER" in env:
        import submitit

        job = submitit.JobEnvironment()
        # The job's first host serves the rendezvous (submitit expands the node list).
        master = env.get("MASTER_ADDR") or (job.hostnames[0] if job.hostnames else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or port_for_job(str(job.job_id)))
        return DistEnv(
            job.global_rank, job.local_rank, job.num_tasks, master, port, str(job.job_id), restart, "submitit"
        )
    # torchrun before Slurm: `srun torchrun ...` gives each of torchrun's processes the Slurm
    # variables of the one task that started them, and torchrun's own say who they are.
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            env.get("SLURM_JOB_ID"),
            restart,
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = env.get("SLURM_JOB_ID", "0")
        # A step may run fewer tasks than its job has.
        world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            world_size,
            env.get("MASTER_ADDR") or hostlist.expand(env.get("SLURM_JOB_NODELIST") or "127.0.0.1")[0],
            int(env.get("MASTER_PORT") or port_for_job(job_id)),
            job_id,
            restart,
            "slurm",
        )
    return DistEnv()


def init(env: DistEnv, gpus_per_node: int = 0) -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on CPU) and return this rank's device.

    A task whose profile asks for GPUs but that sees none (a driver too old for this torch, a
    partition without GPUs) stops here, before any collective: on the CPU it would look like a
    working job while training hundreds of times slower.
    """
    if gpus_per_node and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise RunError(
            f"cluster.gpus_per_node={gpus_per_node} but this task sees no CUDA device on {socket.gethostname()} "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES="
            f"{visible}): stopped instead of training on the CPU. Check that cluster.partition has GPUs and "
            f"that its NVIDIA driver supports this CUDA (nvidia-smi), or set cluster.gpus_per_node=0"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # CPU ranks share the node's cores: without this each would start one thread per core.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, (os.cpu_count() or 1) // env.world_size)
        torch.set_num_threads(cpus)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank, world_size=env.world_size
        )
        log.info(
            "rank %d of %d on %s (%s): %s, rendezvous at %s:%d",
            env.rank,
            env.world_size,
            socket.gethostname(),
            env.source,
            backend,
            env.master_addr,
            env.master_port,
        )
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def agree(record: type[Record], device: torch.device, **local: float) -> Record:
    """A collective: `record` (a dataclass of numbers) with each field summed over all ranks,
    this rank's values given by field name. One all-reduce, whatever the number of fields."""
    names = [f.name for f in fields(record)]
    return record(*all_reduce_sum([float(local[name]) for name in names], device))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
