"""`cluster:`, where the jobs run (a cluster profile): resources, Slurm options, the container,
and the coordinator's budgets. Many of these strings end up in an sbatch script."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from slurmvision.configs.checks import check, choice, one_line


@dataclass
class ContainerConfig:
    """The image the tasks run in: pyxis (`srun --container-image`) or Apptainer/Singularity (`apptainer exec`)."""

    runtime: Optional[str] = None  # pyxis | apptainer | singularity; null: no container
    image: Optional[str] = None  # pyxis: nvcr.io#nvidia/pytorch:24.05-py3 or a .sqsh file; apptainer: a .sif file
    # Host paths the job reads or writes, SRC[:DST[:ro|rw]]; the run directory is mounted without asking.
    mounts: list[str] = field(default_factory=list)
    python: str = "python3"  # the image's interpreter, with slurmvision installed
    args: list[str] = field(default_factory=list)  # more options for srun (pyxis) or `apptainer exec`

    def __post_init__(self) -> None:
        if self.runtime is not None:
            choice("cluster.container.runtime", self.runtime, ("pyxis", "apptainer", "singularity"))
        check(
            bool(self.runtime) == bool(self.image),
            "cluster.container.image",
            self.image,
            "set both cluster.container.runtime and cluster.container.image, or neither",
        )
        for key, values in (
            ("mounts", self.mounts),
            ("args", self.args),
            ("image", [self.image]),
            ("python", [self.python]),
        ):
            for value in values:
                one_line(f"cluster.container.{key}", value)
        for mount in self.mounts:
            parts = mount.split(":")
            check(
                all(p.startswith("/") for p in parts[:2])
                and "," not in mount
                and len(parts) <= 3
                and parts[2:] in ([], ["ro"], ["rw"]),
                "cluster.container.mounts",
                mount,
                "give SRC[:DST[:ro|rw]] with absolute paths, one mount per entry",
            )

    def sees(self, path: str) -> bool:
        return mounted(path, self.mounts)


def mounted(path: str, mounts: list[str]) -> bool:
    """Whether a container sees the absolute `path`: it is inside a mount's destination (SRC[:DST[:opts]])."""
    targets = [mount.split(":")[1] if ":" in mount else mount for mount in mounts]
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


@dataclass
class ClusterConfig:
    """Where jobs run: submitit's local executor or a Slurm cluster."""

    name: str = "local"
    executor: str = "local"  # local | slurm
    nodes: int = 1
    # Fewest nodes an attempt may run on (None: `nodes`). Below `nodes` a job left waiting for a
    # node that failed is shrunk to the nodes that work, and trains at the same global batch
    # (more gradient accumulation); see slurmvision.launch.coordinator.
    min_nodes: Optional[int] = None
    tasks_per_node: int = 2  # one task per GPU (or per CPU rank without GPUs)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    time_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    signal: str = "USR2"  # sent signal_delay_s before the time limit
    signal_delay_s: int = 120
    sigterm_grace_s: int = 30  # SIGTERM to SIGKILL: Slurm's KillWait (preemption adds the partition's GraceTime)
    # Stop at the last step boundary where a step and a save still fit before the time limit,
    # for steps too long for the warning's lead time.
    stop_before_limit: bool = True
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    # The interpreter on the compute nodes (the run-directory check; the tasks unless in a container);
    # null: this one, the login node's.
    python: Optional[str] = None
    container: ContainerConfig = field(default_factory=ContainerConfig)
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options
    # The coordinator's budgets: attempts in all (requeues count), crashes at the same step,
    # node failures; the back-off doubles with each repeat.
    max_attempts: int = 10
    crash_retries: int = 2
    node_failure_retries: int = 3
    retry_backoff_s: float = 30.0
    # Who coordinates a Slurm run after `launch`: a chain of small watcher jobs in Slurm (no
    # login-node process), a login-node daemon, or nobody (`slurmvision coordinate` by hand).
    coordinate: str = "watcher"
    watcher_partition: Optional[str] = None  # default: cluster.partition
    watcher_qos: Optional[str] = None  # default: cluster.qos
    watcher_time_min: int = 10
    # An elastic run's watcher looks this often (a job waiting for a failed node wakes no dependency).
    watcher_every_s: int = 300

    def __post_init__(self) -> None:
        choice("cluster.executor", self.executor, ("local", "slurm"))
        choice("cluster.coordinate", self.coordinate, ("watcher", "daemon", "none"))
        check(
            not self.container.runtime or self.executor == "slurm",
            "cluster.container.runtime",
            self.container.runtime,
            "containers need cluster.executor=slurm (the local executor runs none)",
        )
        for key in (
            "name",
            "partition",
            "account",
            "qos",
            "constraint",
            "exclude",
            "watcher_partition",
            "watcher_qos",
            "python",
        ):
            one_line(f"cluster.{key}", getattr(self, key))
        for i, line in enumerate(self.setup):
            one_line(f"cluster.setup[{i}]", line)
        for option, value in self.additional.items():
            one_line(f"cluster.additional.{option}", option)
            one_line(f"cluster.additional.{option}", value)
        for key in ("crash_retries", "node_failure_retries", "retry_backoff_s", "sigterm_grace_s"):
            check(getattr(self, key) >= 0, f"cluster.{key}", getattr(self, key), "must be >= 0")
        choice("cluster.signal", self.signal, ("USR1", "USR2", "TERM", "INT"))
        for key in (
            "nodes",
            "tasks_per_node",
            "cpus_per_task",
            "time_min",
            "max_attempts",
            "watcher_time_min",
            "watcher_every_s",
        ):
            check(getattr(self, key) >= 1, f"cluster.{key}", getattr(self, key), "must be >= 1")
        check(
            self.min_nodes is None or 1 <= self.min_nodes <= self.nodes,
            "cluster.min_nodes",
            self.min_nodes,
            f"must be 1 to cluster.nodes={self.nodes}, or null",
        )
        check(self.gpus_per_node >= 0, "cluster.gpus_per_node", self.gpus_per_node, "must be >= 0")
        check(
            self.gpus_per_node in (0, self.tasks_per_node),
            "cluster.gpus_per_node",
            self.gpus_per_node,
            f"use one task per GPU: set cluster.tasks_per_node={self.gpus_per_node}",
        )
        check(
            0 <= self.signal_delay_s < self.time_min * 60,
            "cluster.signal_delay_s",
            self.signal_delay_s,
            "must be >= 0 and shorter than the time limit",
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def elastic(self) -> bool:
        """Whether an attempt may start on fewer nodes than `nodes`."""
        return self.min_nodes is not None and self.min_nodes < self.nodes
