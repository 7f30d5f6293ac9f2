"""What both engines share about the optimizer: its parameter groups, its implementation and the fp16
loss-scale floor."""

from __future__ import annotations

import torch

from slurmvision.configs.schema import Config
from slurmvision.errors import RunError

MIN_LOSS_SCALE = 1.0  # DeepSpeed's min_loss_scale


def implementation(config: Config, device: torch.device) -> dict[str, bool]:
    """torch's optimizer implementation (`optim.fused`) as the optimizer's `fused`/`foreach` arguments.

    fused: one kernel per step over all parameters; foreach: a few multi-tensor ops per step; off: a
    loop over the parameters. `auto` takes fused for DDP on CUDA and foreach elsewhere: DeepSpeed's
    ZeRO steps one flat tensor per parameter group, where fusing has nothing left to gain.
    """
    choice = config.optim.fused
    if choice == "auto":
        choice = "fused" if device.type == "cuda" and config.trainer.engine == "ddp" else "foreach"
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"foreach": True}, "off": {"foreach": False}}[choice]


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and the model's no_weight_decay() set
    (Swin's position tables); with `optim.layer_decay`, a group per layer with its LR scale. Built on
    the device the model is on, with the implementation above."""
    from timm.optim import create_optimizer_v2

    optim = config.optim
    extra = {"betas": tuple(optim.betas), "eps": optim.eps} if optim.name == "adamw" else {"momentum": 0.9}
    extra |= implementation(config, next(model.parameters()).device)
    return create_optimizer_v2(
        model,
        opt=optim.name,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        filter_bias_and_bn=True,
        layer_decay=optim.layer_decay,
        **extra,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict(saved)` that keeps this run's implementation (`optim.fused`).

    A state dict's param groups carry the `fused`/`foreach` flags they were saved with, and loading
    would bring them back: a run saved on CPU (foreach) would step unfused on the GPU after a resume.
    The flags are set to the current ones before loading, so torch also places the step counts where
    that implementation wants them (on the parameters' device when fused).
    """
    flags = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    groups = [{**group, **now} for group, now in zip(saved["param_groups"], flags)]
    optimizer.load_state_dict({**saved, "param_groups": groups + saved["param_groups"][len(groups) :]})


def check_loss_scale(scale: float) -> None:
    """Stop once the fp16 loss scale falls below 1: the gradients then overflow whatever the scale.
    torch's GradScaler would halve on towards 0 and train on zeroed gradients; DeepSpeed's own
    scaler raises at its minimum (DeepSpeed issue 5426). Both engines stop here, with advice."""
    if scale < MIN_LOSS_SCALE:
        raise RunError(
            f"the fp16 loss scale fell below {MIN_LOSS_SCALE:g}: the gradients overflow at any scale. "
            "Stopped; the last good checkpoint is kept. Use trainer.precision=bf16, or lower optim.lr"
        )
