"""`optim:` and `trainer:`, how the model is trained: the optimizer and its schedules, the engine,
precision, steps, checkpoints and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slurmvision.configs.checks import check, choice


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
        choice("optim.name", self.name, ("adamw", "sgd"))
        choice("optim.fused", self.fused, ("auto", "fused", "foreach", "off"))
        choice("optim.schedule", self.schedule, ("cosine", "constant"))
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(
            self.weight_decay_end is None or self.weight_decay_end >= 0,
            "optim.weight_decay_end",
            self.weight_decay_end,
            "must be >= 0 or null",
        )
        # The schedule drives the groups that have a weight decay; with none to start from, no
        # group has one (timm may even put every parameter in one group).
        check(
            self.weight_decay_end is None or self.weight_decay > 0,
            "optim.weight_decay_end",
            self.weight_decay_end,
            "needs optim.weight_decay > 0, where its schedule starts",
        )
        check(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "optim.layer_decay",
            self.layer_decay,
            "must be in (0, 1], e.g. 0.9, or null",
        )
        check(len(self.betas) == 2, "optim.betas", self.betas, "give two numbers, e.g. [0.9, 0.999]")
        check(
            self.warmup_steps >= 0 and self.warmup_epochs >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0"
        )
        check(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", self.clip_grad, "must be > 0 or null")
        check(
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
    # thread, and rank 0 commits the checkpoint at a later step boundary (trainer.async_checkpoint).
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
        choice("trainer.engine", self.engine, ("ddp", "deepspeed"))
        choice("trainer.precision", self.precision, ("fp32", "fp16", "bf16"))
        choice("trainer.zero_stage", self.zero_stage, (0, 1, 2, 3))
        for key in ("grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "nonfinite_budget"):
            check(getattr(self, key) >= 1, f"trainer.{key}", getattr(self, key), "must be >= 1")
        check(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "must be >= 0")
        check(self.gradcam_images >= 0, "trainer.gradcam_images", self.gradcam_images, "must be >= 0")
        check(
            0 <= self.initial_scale_power <= 64,
            "trainer.initial_scale_power",
            self.initial_scale_power,
            "must be 0 to 64",
        )
        check(
            self.checkpoint_every_minutes >= 0,
            "trainer.checkpoint_every_minutes",
            self.checkpoint_every_minutes,
            "must be >= 0",
        )
