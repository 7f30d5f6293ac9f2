"""`data:`, the shards a run reads and how its batches are made: sizes, resolutions, augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slurmvision.configs.checks import check, choice


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
    # A remote shard (pipe:/http) whose transfer sends nothing for this long is unreadable: the loader
    # never hangs, so a stop signal is acted on. Keep it below cluster.signal_delay_s.
    remote_timeout_s: float = 60.0
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
            check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "must be >= 1")
        check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        check(self.remote_timeout_s > 0, "data.remote_timeout_s", self.remote_timeout_s, "must be > 0")
        check(all(s >= 8 for s in self.scales), "data.scales", self.scales, "resolutions must be >= 8")
        check(
            not self.scale_batch_sizes or len(self.scale_batch_sizes) == len(self.scales),
            "data.scale_batch_sizes",
            self.scale_batch_sizes,
            "give one batch size per entry of data.scales",
        )
        check(
            all(b >= 1 for b in self.scale_batch_sizes),
            "data.scale_batch_sizes",
            self.scale_batch_sizes,
            "must be >= 1",
        )
        choice("data.interpolation", self.interpolation, ("bilinear", "bicubic", "nearest", "random"))
        check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "data.crop_scale",
            self.crop_scale,
            "give [min, max] area fractions with 0 < min <= max <= 1",
        )
        for key in ("hflip", "reprob", "mixup", "cutmix", "label_smoothing"):
            value = getattr(self, key)
            check(
                0.0 <= value <= 1.0 or key in ("mixup", "cutmix") and value >= 0,
                f"data.{key}",
                value,
                "must be in [0, 1]",
            )
        check(self.bad_sample_budget >= 0, "data.bad_sample_budget", self.bad_sample_budget, "must be >= 0")
        check(self.synthetic_classes >= 2, "data.synthetic_classes", self.synthetic_classes, "must be >= 2")
        check(
            self.synthetic or bool(self.root),
            "data.root",
            self.root,
            "point it at a shards directory (only data.synthetic=true trains without one)",
        )

    @property
    def resolutions(self) -> list[int]:
        return list(self.scales) or [self.img_size]
