"""Engines: how gradients are computed, synchronised and applied. The loop does not branch on them.

`Engine` is the interface the loop uses; `build_engine` picks the implementation, `DDPEngine`
(trainer.ddp) or `DeepSpeedEngine` (trainer.deepspeed_engine). Neither imports this module.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Protocol

import torch

from slurmvision.configs.schema import Config


class Engine(Protocol):
    model: torch.nn.Module  # what the forward pass calls: the module wrapped for DDP, DeepSpeed or torch.compile
    module: torch.nn.Module  # the model itself
    optimizer: torch.optim.Optimizer  # its param groups carry the scheduled LR and weight decay

    def forward_context(self, sync: bool) -> ContextManager[None]:
        """Autocast and, on accumulation micro-steps (`sync=False`), no gradient all-reduce."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> Optional[float]:
        """Unscale, clip, step the optimizer and zero the gradients; the gradient norm if known."""

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss on some rank)."""

    @property
    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale; None without one."""

    def eval_module(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model whole on this rank, to evaluate; `build()` makes an empty copy where the
        engine holds only slices of it."""

    def state_dict(self) -> dict:
        """A collective: the model, optimizer and scaler state, independent of the world size."""

    def load_state_dict(self, state: dict) -> None: ...


def build_engine(
    model: torch.nn.Module, config: Config, device: torch.device, local_rank: int = 0, grad_accum: Optional[int] = None
) -> Engine:
    """The run's engine; `grad_accum` is this attempt's accumulation (Config.grad_accum_at), if not the config's."""
    if config.trainer.engine == "deepspeed":
        from slurmvision.extras import require_engine

        require_engine("deepspeed")  # this node's interpreter may lack what the login node's has
        from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, device, local_rank, grad_accum)
    from slurmvision.trainer.ddp import DDPEngine

    return DDPEngine(model, config, device, grad_accum)
