"""The DDP engine: torch's DistributedDataParallel (plain on one rank), autocast and a GradScaler
for fp16, behind the loop's engine interface (trainer.engine.Engine)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from slurmvision.configs.schema import Config
from slurmvision.trainer.fastpath import compile_model, set_backend_flags
from slurmvision.trainer.optim import build_optimizer, check_loss_scale, load_optimizer_state

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class DDPEngine:
    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device, grad_accum: Optional[int] = None):
        self.config, self.device = config, device
        grad_accum = grad_accum or config.trainer.grad_accum
        self.dtype = _DTYPES[config.trainer.precision]
        set_backend_flags(config, device)
        model.to(device)
        if config.model.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.ddp: Optional[DistributedDataParallel] = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # A static graph saves work per step but cannot be combined with no_sync
                # accumulation, frozen parameters or re-entrant checkpointing.
                static_graph=grad_accum == 1 and not config.model.freeze and not config.model.grad_checkpointing,
                # The gradients live in the all-reduce buckets: no copy in and out, less memory.
                gradient_as_bucket_view=config.trainer.gradient_as_bucket_view,
            )
        self.model = self.ddp if self.ddp is not None else model
        if config.model.compile:  # the whole DDP module, so that compiled graphs break at its buckets
            self.model = compile_model(self.model, config)
        self.optimizer = build_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=2.0**config.trainer.initial_scale_power, enabled=self.dtype is torch.float16
        )

    @contextlib.contextmanager
    def forward_context(self, sync: bool):
        no_sync = self.ddp.no_sync if self.ddp is not None and not sync else contextlib.nullcontext
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
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
