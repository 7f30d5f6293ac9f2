"""The DeepSpeed engine: ZeRO stage 0/1/2/3 in fp32, bf16 or fp16 (torch autocast inside
DeepSpeed, fp32 weights; fp16 with a dynamic loss scale), behind the loop's engine interface
(trainer.engine.Engine).

Gradient accumulation is the loop's (DeepSpeed's `managed_gradient_accumulation=false`):
every micro-step calls `backward`, the step calls `step` once, as with DDP.

Checkpoints hold no DeepSpeed files and do not depend on the world size: the full fp32
weights and the full optimizer state of every parameter, gathered from the ZeRO partitions
(DeepSpeed's flat fp32 groups) on save and cut into the new ranks' partitions on load.
A run saved on 2 ranks resumes on 1 or on 4, which DeepSpeed's own checkpoints cannot. How
each ZeRO stage cuts them is in trainer.zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from slurmvision.configs.schema import Config
from slurmvision.errors import RunError
from slurmvision.trainer.fastpath import CompiledForward, compile_options, fallback_message, set_backend_flags
from slurmvision.trainer.optim import build_optimizer, check_loss_scale, load_optimizer_state
from slurmvision.trainer.zero import FlatPartitions, ParameterPartitions, check_version

log = logging.getLogger("slurmvision.trainer")


def deepspeed_config(config: Config, grad_accum: Optional[int] = None) -> dict:
    trainer, precision = config.trainer, config.trainer.precision
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": grad_accum or trainer.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": trainer.zero_stage},
        # timm's AdamW with parameter groups (no decay on norms and biases) is the optimizer.
        "zero_allow_untested_optimizer": True,
        # Mixed precision through torch autocast inside DeepSpeed's forward: fp32 weights, as
        # with DDP. (DeepSpeed's own bf16/fp16 cast the weights but not the buffers, which breaks
        # models such as Swin V2 whose attention uses fp32 coordinate tables.)
        "torch_autocast": {"enabled": precision != "fp32", "dtype": "float16" if precision == "fp16" else "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for a single rank."""
    if not dist.is_initialized():
        from slurmvision.trainer.distributed import free_port

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )


class DynamicLossScale:
    """The fp16 loss scale for DeepSpeed's ZeRO optimizers, on torch GradScaler's schedule: start
    at 2**trainer.initial_scale_power, halve on an overflow, double after 2000 steps without one.

    Under torch autocast, ZeRO's own GradScaler never sees an overflow (ZeRO skips the step before
    it), so its scale never comes down: with DeepSpeed 0.19.8, 2 ranks of ZeRO-2 overflowed at
    2**16 on every step and applied none. ZeRO already finds an overflow from the all-reduced
    gradient norm (inf or NaN on any rank) and skips the step on every rank; this class only
    chooses the scale, which ZeRO applies as an external one (to the loss, and when it unscales
    the gradients before clipping).
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    def get_scale(self) -> float:
        return self.scale

    def update(self, overflow: bool) -> None:
        if not overflow:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0
            return
        self.scale, self.good_steps = self.scale / 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class DeepSpeedEngine:
    GATHER_CHUNK = 1 << 24  # elements per rank and gather when a checkpoint collects the partitions

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        device: torch.device,
        local_rank: int = 0,
        grad_accum: Optional[int] = None,
    ):
        trainer = config.trainer
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        check_version(deepspeed.__version__)
        # DeepSpeed calls torch.distributed's deprecated *_tensor collectives every step, and
        # each call would print the deprecation again into the rank's log.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")

        self.config, self.device = config, device
        set_backend_flags(config, device)
        model.to(device)
        if config.model.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, config)  # its param_groups carry the scheduled LR
        _process_group(device)
        # DeepSpeed reads the rank from the environment that its own launcher would set.
        os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()), LOCAL_RANK=str(local_rank))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.model, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(config, grad_accum), dist_init_required=False
        )
        self.module = self.model.module
        if config.model.compile:
            self._compile()
        # ZeRO keeps fp32 master weights and optimizer state as flat, per-rank partitions.
        self.zero = self.model.optimizer if trainer.zero_stage else None
        self.layout = ParameterPartitions(self.zero) if trainer.zero_stage == 3 else FlatPartitions(self.zero)
        # fp16: without ZeRO, DeepSpeed drives a torch GradScaler (ours, for its initial scale);
        # ZeRO needs our own scale.
        self.scaler = None
        if trainer.precision == "fp16":
            initial_scale = 2.0**trainer.initial_scale_power
            if self.zero is None:
                self.scaler = torch.amp.GradScaler(device.type, init_scale=initial_scale)
                self.model.torch_autocast_z0_gradscaler = self.scaler
            else:
                self.zero.torch_autocast_gradscaler = None
                self.scaler = DynamicLossScale(initial_scale)
                self.zero.override_loss_scale(self.scaler.get_scale())

    def _compile(self) -> None:
        """DeepSpeed's compile (nn.Module.compile of the model, which keeps the compiled call in the
        module's `_compiled_call_impl`), with trainer.fastpath's fallback to the eager call."""
        try:
            self.model.compile(compile_kwargs=compile_options(self.config))
        except Exception as err:
            log.warning("%s", fallback_message(err))
            return
        self.module._compiled_call_impl = CompiledForward(self.module._compiled_call_impl, self.module._call_impl)

    @contextlib.contextmanager
    def forward_context(self, sync: bool):
        yield  # DeepSpeed's forward applies the autocast of its config; accumulation is the loop's

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divides by grad_accum

    def step(self) -> Optional[float]:
        self.model.step()
        if isinstance(self.scaler, DynamicLossScale):
            self.scaler.update(overflow=not self.model.was_step_applied())
            self.zero.override_loss_scale(self.scaler.get_scale())
        if self.scaler is not None:
            check_loss_scale(self.scaler.get_scale())
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss on some rank)."""
        if self.zero is not None:
            # DeepSpeed's optimizers skip a step whose gradients are not finite and clear them.
            self.model.step()
            if self.model.was_step_applied():
                raise RunError("DeepSpeed applied a step with non-finite gradients; the last good checkpoint is kept")
        else:
            self.model.zero_grad()

    @property
    def loss_scale(self) -> Optional[float]:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def model_state(self) -> dict:
        """The full model state dict on every rank (a collective with ZeRO-3)."""
        return self.layout.model_state(self.module)

    def eval_module(self, build) -> torch.nn.Module:
        return self.layout.eval_module(self.module, build, self.device)

    def state_dict(self) -> dict:
        """World-size-independent state; a collective. Only rank 0, which saves it, holds it whole:
        the partitions are gathered to it in chunks, so no device holds a full copy at once."""
        scaler = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        if self.zero is None:  # ZeRO 0: a plain, replicated optimizer
            return {"model": self.module.state_dict(), "optimizer": self.model.optimizer.state_dict(), **scaler}
        model = self.layout.checkpoint_weights(self.module, self._gather_to_main)
        names = {id(p): n for n, p in self.module.named_parameters()}
        moments, steps = {}, []
        for params, partition in self.layout.groups():
            slot = self.zero.optimizer.state.get(partition, {})
            keys = sorted(k for k, v in slot.items() if torch.is_tensor(v) and v.shape == partition.shape)
            fulls = {key: self._gather_to_main(slot[key]) for key in keys}
            if dist.get_rank() != 0:
                continue
            fulls = {key: self.layout.split(params, slices) for key, slices in fulls.items()}
            for j, param in enumerate(params):
                moments[names[id(param)]] = {k: fulls[k][j].clone() for k in keys}
            steps.append(slot["step"].clone().cpu() if torch.is_tensor(slot.get("step")) else torch.tensor(0.0))
        return {"model": model, "optimizer_state": moments, "optimizer_steps": steps, **scaler}

    def load_state_dict(self, state: dict) -> None:
        self.layout.load_weights(self.module, state["model"])
        if ("optimizer" in state) != (self.zero is None):
            saved = "a plain optimizer (ZeRO stage 0)" if "optimizer" in state else "ZeRO-partitioned optimizer state"
            raise RunError(f"this checkpoint holds {saved}: resume it with the trainer.zero_stage it was saved with")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            if isinstance(self.scaler, DynamicLossScale):
                self.zero.override_loss_scale(self.scaler.get_scale())
        if self.zero is None:
            load_optimizer_state(self.model.optimizer, state["optimizer"])
            return
        names = {id(p): n for n, p in self.module.named_parameters()}
        own_slice, steps = self.layout.own_slice, state["optimizer_steps"]
        for i, (params, partition) in enumerate(self.layout.groups()):
            partition.data.copy_(own_slice(params, [state["model"][names[id(p)]] for p in params], partition))
            keys = state["optimizer_state"][names[id(params[0])]].keys()
            if keys:  # saved before the first step, the optimizer had no state yet
                slot = {
                    k: own_slice(params, [state["optimizer_state"][names[id(p)]][k] for p in params], partition)
                    for k in keys
                }
                # Every group steps together: a checkpoint from another stage may group differently.
                self.zero.optimizer.state[partition] = {**slot, "step": steps[min(i, len(steps) - 1)].clone()}

    def _gather_to_main(self, partition: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slice of a ZeRO partition, on rank 0's CPU (a collective; [] elsewhere).

        In chunks, so rank 0's device holds at most one chunk per rank at a time."""
        world, main, chunk = dist.get_world_size(), dist.get_rank() == 0, self.GATHER_CHUNK
        slices = [torch.empty(partition.numel(), dtype=partition.dtype) for _ in range(world)] if main else []
        flat = partition.contiguous().view(-1)
        for start in range(0, flat.numel(), chunk):
            piece = flat[start : start + chunk]
            received = [torch.empty_like(piece) for _ in range(world)] if main else None
            dist.gather(piece, received, dst=0)
            for whole, part in zip(slices, received or []):
                whole[start : start + piece.numel()].copy_(part)
        return slices
