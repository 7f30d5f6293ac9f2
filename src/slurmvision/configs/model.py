"""`model:`, the timm model, the weights it starts from, its EMA and the teacher it may learn from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from slurmvision.configs.checks import check


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # a timm model name; None disables distillation
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    teacher_weights: Optional[str] = None  # a slurmvision run/checkpoint directory or a state-dict file
    temperature: float = 4.0
    weight: float = 0.5  # loss = (1 - weight) * task + weight * KL

    def __post_init__(self) -> None:
        check(self.temperature > 0, "model.distill.temperature", self.temperature, "must be > 0")
        check(0.0 <= self.weight <= 1.0, "model.distill.weight", self.weight, "must be in [0, 1]")
        check(
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
        check(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "must be in [0, 1)")
        check(0.0 <= self.ema_decay < 1.0, "model.ema_decay", self.ema_decay, "must be in [0, 1)")
        check(self.num_classes is None or self.num_classes >= 2, "model.num_classes", self.num_classes, "must be >= 2")
        check(
            self.pretrained or not self.pretrained_file,
            "model.pretrained_file",
            self.pretrained_file,
            "set model.pretrained=true to start from it",
        )
