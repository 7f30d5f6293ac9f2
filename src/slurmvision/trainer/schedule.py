"""Learning-rate schedules from timm, used as pure functions of the optimizer step."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from slurmvision.configs import Config

log = logging.getLogger(__name__)


def build_lr_schedule(optimizer: torch.optim.Optimizer, config: Config, global_batch: int,
                      samples_per_epoch: int) -> Callable[[int], float]:
    """`lr_at(step)`: sets the optimizer's learning rates for `step` and returns the base one.

    The peak LR is scaled linearly from `optim.lr_base_batch` to the real global batch;
    warm-up given in epochs is converted with the train split's size.
    """
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    optim = config.optim
    peak = optim.lr * global_batch / optim.lr_base_batch if optim.lr_base_batch else optim.lr
    warmup = optim.warmup_steps or round(optim.warmup_epochs * samples_per_epoch / global_batch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak
    common = dict(warmup_t=warmup, warmup_lr_init=optim.warmup_lr, t_in_epochs=False)
    if optim.schedule == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=config.trainer.max_steps, lr_min=optim.min_lr, **common)
    else:
        scheduler = StepLRScheduler(optimizer, decay_t=config.trainer.max_steps + 1, decay_rate=1.0, **common)
    log.info("peak lr %.3g at global batch %d, %d warm-up steps", peak, global_batch, warmup)

    def lr_at(step: int) -> float:
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

    return lr_at
