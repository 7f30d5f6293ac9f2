"""Typed config sections. Value checks live in `__post_init__` and name the key at fault.

OmegaConf checks types and unknown keys when recipes and overrides are merged onto these
dataclasses; `__post_init__` runs when the merged config is turned into objects and checks
values (ranges, choices, combinations). This module must not import torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from slurmvision.errors import ConfigError


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}{hint}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _one_line(key: str, value: Any) -> None:
    """Strings that go into an sbatch script or a job name: a newline or another control
    character would end an #SBATCH line early or add a line of its own."""
    _check(not isinstance(value, str) or value.isprintable(), key, value, "remove the newline or control character")


@dataclass
class DataConfig:
    root: str = "???"  # the shards directory (holds manifest.json)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 32  # per rank and per micro-step, at the base resolution
    workers: int = 2
    shuffle_buffer: int = 1000
    img_size: int = 224
    # Multi-scale: one resolution per batch, chosen from (seed, step); same on every rank.
    scales: list[int] = field(default_factory=list)
    # Per-scale batch sizes (same length as scales) keep memory flat; empty = batch_size.
    scale_batch_sizes: list[int] = field(default_factory=list)
    interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None  # timm string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    # Skipped bad samples allowed per epoch: < 1 is a fraction of the epoch, >= 1 a count.
    bad_sample_budget: float = 0.001
    audit: bool = False  # record the key of every consumed sample per rank and step
    eval_resize_ratio: float = 0.875
    # CUDA: the next batch's copy to the GPU (pinned memory, non_blocking) is issued before this step's compute.
    prefetch_to_device: bool = True
    # Random batches held in memory instead of the shard reader (timm's benchmark does the same): the loop's
    # own speed, apart from the data pipeline's. No evaluation; labels from the manifest's classes, or from
    # synthetic_classes where data.root is not set.
    synthetic: bool = False
    synthetic_classes: int = 1000

    def __post_init__(self) -> None:
        for key in ("batch_size", "img_size", "shuffle_buffer"):
            _check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "must be >= 1")
        _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        _check(all(s >= 8 for s in self.scales), "data.scales", self.scales, "resolutions must be >= 8")
        _check(
            not self.scale_batch_sizes or len(self.scale_batch_sizes) == len(self.scales),
            "data.scale_batch_sizes",
            self.scale_batch_sizes,
            "give one batch size per entry of data.scales",
        )
        _check(
            all(b >= 1 for b in self.scale_batch_sizes),
            "data.scale_batch_sizes",
            self.scale_batch_sizes,
            "must be >= 1",
        )
        _choice("data.interpolation", self.interpolation, ("bilinear", "bicubic", "nearest", "random"))
        _check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "data.crop_scale",
            self.crop_scale,
            "give [min, max] area fractions with 0 < min <= max <= 1",
        )
        for key in ("hflip", "reprob", "mixup", "cutmix", "label_smoothing"):
            value = getattr(self, key)
            _check(
                0.0 <= value <= 1.0 or key in ("mixup", "cutmix") and value >= 0,
                f"data.{key}",
                value,
                "must be in [0, 1]",
            )
        _check(self.bad_sample_budget >= 0, "data.bad_sample_budget", self.bad_sample_budget, "must be >= 0")
        _check(self.synthetic_classes >= 2, "data.synthetic_classes", self.synthetic_classes, "must be >= 2")
        _check(
            self.synthetic or bool(self.root),
            "data.root",
            self.root,
            "point it at a shards directory (only data.synthetic=true trains without one)",
        )

    @property
    def resolutions(self) -> list[int]:
        return list(self.scales) or [self.img_size]


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # a timm model name; None disables distillation
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    teacher_weights: Optional[str] = None  # a slurmvision run/checkpoint directory or a state-dict file
    temperature: float = 4.0
    weight: float = 0.5  # loss = (1 - weight) * task + weight * KL

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "model.distill.temperature", self.temperature, "must be > 0")
        _check(0.0 <= self.weight <= 1.0, "model.distill.weight", self.weight, "must be in [0, 1]")
        _check(
            not self.teacher or bool(self.teacher_weights),
            "model.distill.teacher_weights",
            self.teacher_weights,
            "the teacher needs its trained weights (a run directory or a weights file)",
        )


@dataclass
class ModelConfig:
    name: str = "swinv2_tiny_window8_256"  # any timm model name
    num_classes: Optional[int] = None  # None: taken from the shards' manifest
    pretrained: bool = False
    drop_path: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    grad_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    ema_decay: float = 0.0  # 0 disables the EMA model
    finetune_from: Optional[str] = None  # weights to start from; the classifier is re-created
    # model.pretrained=true: the weights file the ranks load (null: timm's, which `launch` fetches on the login
    # node into cache_dir; the ranks never download); cache_dir null: the Hugging Face cache (HF_HUB_CACHE).
    pretrained_file: Optional[str] = None
    cache_dir: Optional[str] = None
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes to freeze
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "must be in [0, 1)")
        _check(0.0 <= self.ema_decay < 1.0, "model.ema_decay", self.ema_decay, "must be in [0, 1)")
        _check(self.num_classes is None or self.num_classes >= 2, "model.num_classes", self.num_classes, "must be >= 2")
        _check(
            self.pretrained or not self.pretrained_file,
            "model.pretrained_file",
            self.pretrained_file,
            "set model.pretrained=true to start from it",
        )


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    # The learning rate is given at this global batch and scaled linearly to the real one.
    lr_base_batch: Optional[int] = None
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None  # cosine weight-decay schedule to this value; None: constant
    layer_decay: Optional[float] = None  # layer-wise LR decay (timm), e.g. 0.9 when fine-tuning; None: off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # converted to steps from the train split's size
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: Optional[float] = None
    # torch's implementation: fused (one kernel), foreach (multi-tensor), off (a loop over the parameters);
    # auto: fused for DDP on CUDA, foreach elsewhere (see slurmvision.trainer.optim.implementation).
    fused: str = "auto"

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _choice("optim.fused", self.fused, ("auto", "fused", "foreach", "off"))
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            self.weight_decay_end is None or self.weight_decay_end >= 0,
            "optim.weight_decay_end",
            self.weight_decay_end,
            "must be >= 0 or null",
        )
        # The schedule drives the groups that have a weight decay; with none to start from, no
        # group has one (timm may even put every parameter in one group).
        _check(
            self.weight_decay_end is None or self.weight_decay > 0,
            "optim.weight_decay_end",
            self.weight_decay_end,
            "needs optim.weight_decay > 0, where its schedule starts",
        )
        _check(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "optim.layer_decay",
            self.layer_decay,
            "must be in (0, 1], e.g. 0.9, or null",
        )
        _check(len(self.betas) == 2, "optim.betas", self.betas, "give two numbers, e.g. [0.9, 0.999]")
        _check(
            self.warmup_steps >= 0 and self.warmup_epochs >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0"
        )
        _check(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", self.clip_grad, "must be > 0 or null")
        _check(
            self.lr_base_batch is None or self.lr_base_batch >= 1,
            "optim.lr_base_batch",
            self.lr_base_batch,
            "must be >= 1",
        )


@dataclass
class TrainerConfig:
    engine: str = "ddp"
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1, 2 or 3 (3 also partitions the weights)
    precision: str = "fp32"
    initial_scale_power: int = 16  # fp16: the dynamic loss scale starts at 2**initial_scale_power
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    checkpoint_every: int = 500  # steps between periodic checkpoints
    checkpoint_every_minutes: float = 0.0  # 0 disables time-based checkpoints
    keep_checkpoints: int = 3
    # Training waits only for the state's copy to host memory; each rank writes its files in a background
    # thread, and rank 0 commits the checkpoint at a later step boundary (trainer.checkpoint).
    async_checkpoint: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    gradcam_images: int = 4  # Grad-CAM overlays of this many val images in TensorBoard at each evaluation; 0: none
    seed: int = 0
    nonfinite_budget: int = 5  # consecutive non-finite steps before the run stops
    allow_config_change: bool = False  # resume even if the model, data or optimisation changed
    # The GPU fast path (slurmvision.trainer.fastpath); each does nothing without CUDA.
    tf32: bool = True  # TF32 matmuls and convolutions where autocast leaves fp32 (Ampere and newer)
    cudnn_benchmark: bool = True  # cuDNN times the convolution algorithms once per input shape
    gradient_as_bucket_view: bool = True  # DDP: gradients are views into the all-reduce buckets (no copy)

    def __post_init__(self) -> None:
        _choice("trainer.engine", self.engine, ("ddp", "deepspeed"))
        _choice("trainer.precision", self.precision, ("fp32", "fp16", "bf16"))
        _choice("trainer.zero_stage", self.zero_stage, (0, 1, 2, 3))
        for key in ("grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "nonfinite_budget"):
            _check(getattr(self, key) >= 1, f"trainer.{key}", getattr(self, key), "must be >= 1")
        _check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "must be >= 0")
        _check(self.gradcam_images >= 0, "trainer.gradcam_images", self.gradcam_images, "must be >= 0")
        _check(
            0 <= self.initial_scale_power <= 64,
            "trainer.initial_scale_power",
            self.initial_scale_power,
            "must be 0 to 64",
        )
        _check(
            self.checkpoint_every_minutes >= 0,
            "trainer.checkpoint_every_minutes",
            self.checkpoint_every_minutes,
            "must be >= 0",
        )


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
            _choice("cluster.container.runtime", self.runtime, ("pyxis", "apptainer", "singularity"))
        _check(
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
                _one_line(f"cluster.container.{key}", value)
        for mount in self.mounts:
            parts = mount.split(":")
            _check(
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
        _choice("cluster.executor", self.executor, ("local", "slurm"))
        _choice("cluster.coordinate", self.coordinate, ("watcher", "daemon", "none"))
        _check(
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
            _one_line(f"cluster.{key}", getattr(self, key))
        for i, line in enumerate(self.setup):
            _one_line(f"cluster.setup[{i}]", line)
        for option, value in self.additional.items():
            _one_line(f"cluster.additional.{option}", option)
            _one_line(f"cluster.additional.{option}", value)
        for key in ("crash_retries", "node_failure_retries", "retry_backoff_s", "sigterm_grace_s"):
            _check(getattr(self, key) >= 0, f"cluster.{key}", getattr(self, key), "must be >= 0")
        _choice("cluster.signal", self.signal, ("USR1", "USR2", "TERM", "INT"))
        for key in (
            "nodes",
            "tasks_per_node",
            "cpus_per_task",
            "time_min",
            "max_attempts",
            "watcher_time_min",
            "watcher_every_s",
        ):
            _check(getattr(self, key) >= 1, f"cluster.{key}", getattr(self, key), "must be >= 1")
        _check(
            self.min_nodes is None or 1 <= self.min_nodes <= self.nodes,
            "cluster.min_nodes",
            self.min_nodes,
            f"must be 1 to cluster.nodes={self.nodes}, or null",
        )
        _check(self.gpus_per_node >= 0, "cluster.gpus_per_node", self.gpus_per_node, "must be >= 0")
        _check(
            self.gpus_per_node in (0, self.tasks_per_node),
            "cluster.gpus_per_node",
            self.gpus_per_node,
            f"use one task per GPU: set cluster.tasks_per_node={self.gpus_per_node}",
        )
        _check(
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


@dataclass
class RunConfig:
    dir: str = "???"  # set from --run-dir or derived from the recipe name
    name: str = "run"
    # The run directory is private to its owner; this lets the owner's group read its TensorBoard
    # events (the run directory becomes traversable, never readable or writable, by the group).
    share_with_group: bool = False

    def __post_init__(self) -> None:
        _one_line("run.dir", self.dir)
        _one_line("run.name", self.name)


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
