"""What the cluster offers (sinfo), checked against a profile before anything is submitted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from slurmvision.configs.cluster import ClusterConfig
from slurmvision.errors import ClusterError
from slurmvision.slurm import client


@dataclass
class Partition:
    name: str
    default: bool
    time_limit_min: Optional[int]  # None: unlimited
    gpus_per_node: int


def parse_time_limit(text: str) -> Optional[int]:
    """Slurm time 'days-hours:minutes:seconds' (any prefix form) in minutes; None for infinite."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, minutes, seconds = (0, *parts) if days == 0 else (*parts, 0)
    else:
        hours, minutes, seconds = (parts[0], 0, 0) if days else (0, parts[0], 0)
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def parse_gpus(gres: str) -> int:
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def parse_kill_wait(scontrol_config: str) -> Optional[int]:
    """KillWait from `scontrol show config`: seconds from a SIGTERM to the SIGKILL."""
    match = re.search(r"^KillWait\s*=\s*(\d+)", scontrol_config, re.MULTILINE)
    return int(match.group(1)) if match else None


def partitions() -> dict[str, Partition]:
    out = client.partitions()
    found: dict[str, Partition] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        name, limit, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = parse_gpus(gres)
        if name in found:
            gpus = max(gpus, found[name].gpus_per_node)
        found[name] = Partition(name, default, parse_time_limit(limit), gpus)
    return found


def validate_cluster(cluster: ClusterConfig) -> None:
    """Refuse, before submitting, what the cluster cannot run; one message each."""
    available = partitions()
    if not available:
        raise ClusterError("sinfo lists no partitions: is this a Slurm cluster you can submit to?")
    if cluster.partition is None:
        partition = next((p for p in available.values() if p.default), None)
        if partition is None:
            raise ClusterError(
                f"the cluster has no default partition: set cluster.partition to one of {', '.join(available)}"
            )
    elif cluster.partition not in available:
        raise ClusterError(
            f"partition {cluster.partition!r} does not exist on this cluster: set cluster.partition to one of "
            f"{', '.join(sorted(available))}"
        )
    else:
        partition = available[cluster.partition]
    if partition.time_limit_min is not None and cluster.time_min > partition.time_limit_min:
        raise ClusterError(
            f"cluster.time_min={cluster.time_min} exceeds partition {partition.name!r}'s limit of "
            f"{partition.time_limit_min} min: lower it (checkpoints make long runs span several jobs)"
        )
    # The shortest time Slurm leaves after a SIGTERM: scancel, requeue and the time limit give
    # KillWait; preemption gives the partition's GraceTime first, then KillWait.
    kill_wait = parse_kill_wait(client.cluster_config())
    if kill_wait is not None and cluster.sigterm_grace_s > kill_wait:
        raise ClusterError(
            f"cluster.sigterm_grace_s={cluster.sigterm_grace_s} but this cluster kills a job {kill_wait}s "
            f"after its SIGTERM (KillWait): set cluster.sigterm_grace_s={kill_wait}, or a step planned "
            "to finish in that time would be killed mid-save"
        )
    if cluster.gpus_per_node > partition.gpus_per_node:
        raise ClusterError(
            f"cluster.gpus_per_node={cluster.gpus_per_node} but nodes of partition {partition.name!r} have "
            f"{partition.gpus_per_node} GPUs: lower it or choose another partition"
        )
