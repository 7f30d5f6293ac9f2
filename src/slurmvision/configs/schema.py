"""The whole config: its sections (configs/data.py, model.py, training.py, cluster.py; RunConfig here)
and the checks that need more than one of them.

OmegaConf checks types and unknown keys when recipes and overrides are merged onto these
dataclasses; `__post_init__` runs when the merged config is turned into objects and checks
values (ranges, choices, combinations) and names the key at fault. No module of the package
imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from slurmvision.configs.checks import one_line
from slurmvision.configs.cluster import ClusterConfig
from slurmvision.configs.data import DataConfig
from slurmvision.configs.model import ModelConfig
from slurmvision.configs.training import OptimConfig, TrainerConfig
from slurmvision.errors import ConfigError


@dataclass
class RunConfig:
    dir: str = "???"  # set from --run-dir or derived from the recipe name
    name: str = "run"
    # The run directory is private to its owner; this lets the owner's group read its TensorBoard
    # events (the run directory becomes traversable, never readable or writable, by the group).
    share_with_group: bool = False

    def __post_init__(self) -> None:
        one_line("run.dir", self.dir)
        one_line("run.name", self.name)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.trainer.engine == "ddp" and self.trainer.zero_stage:
            raise ConfigError(f"trainer.zero_stage={self.trainer.zero_stage} needs trainer.engine=deepspeed")
        if self.trainer.zero_stage == 3 and self.model.ema_decay:
            raise ConfigError(
                "model.ema_decay keeps a full copy of the weights on every rank, which ZeRO-3 "
                "partitions: set model.ema_decay=0 or use trainer.zero_stage=2"
            )
        if self.cluster.elastic:
            self._check_elastic_batch()
        if self.data.synthetic and not self.data.root and self.optim.warmup_epochs:
            raise ConfigError("optim.warmup_epochs needs the shards' size: give optim.warmup_steps with synthetic data")
        if self.cluster.container.runtime:
            self._check_container_paths()

    def _check_container_paths(self) -> None:
        """What the ranks read must be mounted in the container (the run directory always is)."""
        for key, path in (
            ("data.root", self.data.root),
            ("model.pretrained_file", self.model.pretrained_file),
            ("model.cache_dir", self.model.cache_dir),
            ("model.finetune_from", self.model.finetune_from),
            ("model.distill.teacher_weights", self.model.distill.teacher_weights),
        ):
            if path and not path.startswith("/"):
                raise ConfigError(f"{key}={path!r} is read in a container: give an absolute path")
            if path and not self.cluster.container.sees(path):
                raise ConfigError(
                    f"{key}={path} is not mounted in the container: add it, or a directory above it, "
                    f"to cluster.container.mounts (now {list(self.cluster.container.mounts)})"
                )

    def _check_elastic_batch(self) -> None:
        """Every node count from min_nodes to nodes must split the global batch into whole micro-batches."""
        cluster, accum = self.cluster, self.trainer.grad_accum
        counts = range(cluster.min_nodes, cluster.nodes + 1)
        if all(cluster.nodes * accum % n == 0 for n in counts):
            return
        fits = next(k * accum for k in range(2, 10_000) if all(cluster.nodes * k * accum % n == 0 for n in counts))
        raise ConfigError(
            f"trainer.grad_accum={accum} cannot keep the global batch on {cluster.min_nodes} to "
            f"{cluster.nodes} nodes (cluster.min_nodes): set trainer.grad_accum={fits}, or raise "
            "cluster.min_nodes"
        )

    def grad_accum_at(self, world_size: int) -> int:
        """Micro-batches per step with this many ranks: an elastic run keeps its global batch on
        fewer ranks by accumulating more; any other run accumulates trainer.grad_accum."""
        if not self.cluster.elastic or world_size == self.cluster.world_size:
            return self.trainer.grad_accum
        micro_batches = self.cluster.world_size * self.trainer.grad_accum
        if micro_batches % world_size:
            raise ConfigError(
                f"{world_size} ranks cannot share the global batch of {micro_batches} micro-batches of "
                f"cluster.nodes={self.cluster.nodes} x cluster.tasks_per_node="
                f"{self.cluster.tasks_per_node} x trainer.grad_accum={self.trainer.grad_accum}"
            )
        return micro_batches // world_size
