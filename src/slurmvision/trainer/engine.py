"""Engines: how gradients are computed, synchronised and applied. The loop does not branch on them.

Interface: `forward_context(sync)` (autocast and, for DDP, `no_sync` on accumulation
micro-steps), `backward(loss)`, `step() -> grad_norm` (unscale, clip, optimizer step,
zero grads), `skip()` (drop this step's gradients), `state_dict()`/`load_state_dict()` and
`eval_module(build)` (the model whole on this rank, to evaluate; `build()` makes an empty
copy where the engine holds only slices of it).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from slurmvision.configs.schema import Config
from slurmvision.errors import RunError

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_LOSS_SCALE = 1.0  # DeepSpeed's min_loss_scale


def check_loss_scale(scale: float) -> None:
    """Stop once the fp16 loss scale falls below 1: the gradients then overflow whatever the scale.
    torch's GradScaler would halve on towards 0 and train on zeroed gradients; DeepSpeed's own
    scaler raises at its minimum (DeepSpeed issue 5426). Both engines stop here, with advice."""
    if scale < MIN_LOSS_SCALE:
        raise RunError(f"the fp16 loss scale fell below {MIN_LOSS_SCALE:g}: the gradients overflow at any scale. "
                       "Stopped; the last good checkpoint is kept. Use trainer.precision=bf16, or lower optim.lr")


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and the model's no_weight_decay() set
    (Swin's position tables); with `optim.layer_decay`, a group per layer with its LR scale."""
    from timm.optim import create_optimizer_v2

    optim = config.optim
    extra = {"betas": tuple(optim.betas), "eps": optim.eps} if optim.name == "adamw" else {"momentum": 0.9}
    return create_optimizer_v2(model, opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                               filter_bias_and_bn=True, layer_decay=optim.layer_decay, **extra)


class DDPEngine:
    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device, grad_accum: Optional[int] = None):
        self.config, self.device = config, device
        grad_accum = grad_accum or config.trainer.grad_accum
        self.dtype = _DTYPES[config.trainer.precision]
        model.to(device)
        if config.model.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.model = model
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                # A static graph saves work per step but cannot be combined with no_sync
                # accumulation, frozen parameters or re-entrant checkpointing.
                static_graph=grad_accum == 1 and not config.model.freeze and not config.model.grad_checkpointing,
            )
        if config.model.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**config.trainer.initial_scale_power,
                                           enabled=self.dtype is torch.float16)

    @contextlib.contextmanager
    def forward_context(self, sync: bool):
        no_sync = self.model.no_sync if isinstance(self.model, DistributedDataParallel) and not sync else contextlib.nullcontext
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)
        with no_sync(), autocast:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> Optional[float]:
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.clip_grad
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            check_loss_scale(self.scaler.get_scale())
        return float(norm)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def loss_scale(self) -> Optional[float]:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def eval_module(self, build) -> torch.nn.Module:
        return self.module

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_engine(model: torch.nn.Module, config: Config, device: torch.device, local_rank: int = 0,
                 grad_accum: Optional[int] = None):
    """The run's engine; `grad_accum` is this attempt's accumulation (Config.grad_accum_at), if not the config's."""
    if config.trainer.engine == "deepspeed":
        from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, device, local_rank, grad_accum)
    return DDPEngine(model, config, device, grad_accum)
