"""What both engines share about the optimizer: its parameter groups and the fp16 loss-scale floor."""

from __future__ import annotations

import torch

from slurmvision.configs.schema import Config
from slurmvision.errors import RunError

MIN_LOSS_SCALE = 1.0  # DeepSpeed's min_loss_scale


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and the model's no_weight_decay() set
    (Swin's position tables); with `optim.layer_decay`, a group per layer with its LR scale."""
    from timm.optim import create_optimizer_v2

    optim = config.optim
    extra = {"betas": tuple(optim.betas), "eps": optim.eps} if optim.name == "adamw" else {"momentum": 0.9}
    return create_optimizer_v2(
        model,
        opt=optim.name,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        filter_bias_and_bn=True,
        layer_decay=optim.layer_decay,
        **extra,
    )


def check_loss_scale(scale: float) -> None:
    """Stop once the fp16 loss scale falls below 1: the gradients then overflow whatever the scale.
    torch's GradScaler would halve on towards 0 and train on zeroed gradients; DeepSpeed's own
    scaler raises at its minimum (DeepSpeed issue 5426). Both engines stop here, with advice."""
    if scale < MIN_LOSS_SCALE:
        raise RunError(
            f"the fp16 loss scale fell below {MIN_LOSS_SCALE:g}: the gradients overflow at any scale. "
            "Stopped; the last good checkpoint is kept. Use trainer.precision=bf16, or lower optim.lr"
        )
