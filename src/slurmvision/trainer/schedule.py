"""Learning-rate and weight-decay schedules, used as pure functions of the optimizer step.

The LR follows timm's schedulers (warm-up, then cosine or constant). The weight decay of the
groups that have one goes from `optim.weight_decay` to `optim.weight_decay_end` on a cosine
over the run, as in DINO and EVA; without `weight_decay_end` it stays constant.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from slurmvision.configs import Config

log = logging.getLogger(__name__)


def build_schedule(
    optimizer: torch.optim.Optimizer, config: Config, global_batch: int, samples_per_epoch: int
) -> Callable[[int], tuple[float, float]]:
    """`at(step)`: sets the optimizer's learning rates and weight decays for `step`, and returns
    the base LR (before any layer-wise scale) and the weight decay.

    The peak LR is scaled linearly from `optim.lr_base_batch` to the real global batch;
    warm-up given in epochs is converted with the train split's size. Build it after the
    optimizer's state is loaded: loading replaces the param-group dicts it writes to.
    """
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    optim, max_steps = config.optim, config.trainer.max_steps
    peak = optim.lr * global_batch / optim.lr_base_batch if optim.lr_base_batch else optim.lr
    warmup = optim.warmup_steps or round(optim.warmup_epochs * samples_per_epoch / global_batch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak  # timm's scheduler applies each group's lr_scale (layer decay)
    common = dict(warmup_t=warmup, warmup_lr_init=optim.warmup_lr, t_in_epochs=False)
    if optim.schedule == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=max_steps, lr_min=optim.min_lr, **common)
    else:
        scheduler = StepLRScheduler(optimizer, decay_t=max_steps + 1, decay_rate=1.0, **common)
    # Norms, biases and position tables have no weight decay, and keep none.
    decayed = [group for group in optimizer.param_groups if group["weight_decay"] > 0]
    wd_start = optim.weight_decay
    wd_end = wd_start if optim.weight_decay_end is None else optim.weight_decay_end
    log.info(
        "peak lr %.3g at global batch %d, %d warm-up steps; weight decay %.3g to %.3g",
        peak,
        global_batch,
        warmup,
        wd_start,
        wd_end,
    )

    def at(step: int) -> tuple[float, float]:
        scheduler.step_update(step)
        weight_decay = wd_end + (wd_start - wd_end) * 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
        for group in decayed:
            group["weight_decay"] = weight_decay
        first = optimizer.param_groups[0]
        return first["lr"] / first.get("lr_scale", 1.0), weight_decay

    return at
