"""The DeepSpeed engine: ZeRO stage 0/1/2, fp16 with dynamic loss scaling, bf16, behind the
loop's engine interface (see trainer.engine).

Gradient accumulation is the loop's (DeepSpeed's `managed_gradient_accumulation=false`):
every micro-step calls `backward`, the step calls `step` once, as with DDP.

Checkpoints hold no DeepSpeed files and do not depend on the world size: the full fp32
weights and the full optimizer state of every parameter, gathered from the ZeRO partitions
(DeepSpeed's flat fp32 groups) on save and cut into the new ranks' partitions on load.
A run saved on 2 ranks resumes on 1 or on 4, which DeepSpeed's own checkpoints cannot.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from slurmvision.configs.schema import Config
from slurmvision.errors import ConfigError, RunError

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_config(config: Config) -> dict:
    trainer, precision = config.trainer, config.trainer.precision
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": trainer.zero_stage},
        # timm's AdamW with parameter groups (no decay on norms and biases) is the optimizer.
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for a single rank."""
    if not dist.is_initialized():
        from slurmvision.trainer.distributed import free_port

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, config: Config, device: torch.device, local_rank: int = 0):
        from slurmvision.trainer.engine import build_optimizer

        trainer = config.trainer
        self.dtype = _DTYPES[trainer.precision]
        if self.dtype is torch.float16 and device.type == "cpu":
            raise ConfigError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        if self.dtype is not None and not trainer.zero_stage:
            raise ConfigError(f"trainer.precision={trainer.precision} with DeepSpeed needs trainer.zero_stage=1 or 2 "
                              "(stage 0 is plain data parallelism: trainer.engine=ddp does it with any precision)")
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.config, self.device = config, device
        model.to(device)
        if config.model.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, config)  # its param_groups carry the scheduled LR
        _process_group(device)
        # DeepSpeed reads the rank from the environment that its own launcher would set.
        os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()), LOCAL_RANK=str(local_rank))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.model, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                   config=deepspeed_config(config), dist_init_required=False)
        self.module = self.model.module
        if config.model.compile:
            self.model.compile()
        # ZeRO 1/2 keep fp32 master weights and optimizer state as flat, per-rank partitions.
        self.zero = self.model.optimizer if trainer.zero_stage else None

    @contextlib.contextmanager
    def forward_context(self, sync: bool):
        # DeepSpeed holds fp16/bf16 weights; autocast gives their ops matching inputs and
        # keeps the numerically sensitive ones (norms, softmax) in fp32.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divides by grad_accum

    def step(self) -> Optional[float]:
        self.model.step()
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
        if self.dtype is not torch.float16:
            return None
        return float(self.zero.loss_scale)

    def state_dict(self) -> dict:
        """World-size-independent state; a collective (every rank calls it, rank 0 saves it)."""
        if self.zero is None:  # ZeRO 0 in fp32: a plain, replicated optimizer
            return {"model": self.module.state_dict(), "optimizer": self.model.optimizer.state_dict()}
        names = {id(p): n for n, p in self.module.named_parameters()}
        master, moments, steps = {}, {}, []
        for i, params in enumerate(self.zero.round_robin_bit16_groups):
            partition = self.zero.single_partition_of_fp32_groups[i]
            slot = self.zero.optimizer.state.get(partition, {})
            keys = sorted(k for k, v in slot.items() if torch.is_tensor(v) and v.shape == partition.shape)
            fulls = {key: self._gather(tensor) for key, tensor in [("master", partition), *((k, slot[k]) for k in keys)]}
            offset = 0
            for param in params:
                name, size = names[id(param)], param.numel()
                master[name] = fulls["master"][offset:offset + size].view_as(param).clone()
                moments[name] = {k: fulls[k][offset:offset + size].view_as(param).clone() for k in keys}
                offset += size
            steps.append(slot["step"].clone().cpu() if torch.is_tensor(slot.get("step")) else torch.tensor(0.0))
        # The fp32 master weights are the model: evaluation and fine-tuning read "model".
        model = {n: master.get(n, t).cpu() for n, t in self.module.state_dict().items()}
        state = {"model": model, "optimizer_state": moments, "optimizer_steps": steps}
        if self.dtype is torch.float16:
            scaler = self.zero.loss_scaler
            state["loss_scaler"] = {f: float(getattr(scaler, f)) for f in _SCALER_FIELDS if hasattr(scaler, f)}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])  # the working (fp16/bf16/fp32) weights
        if ("optimizer" in state) != (self.zero is None):
            saved = "a plain optimizer (ZeRO stage 0)" if "optimizer" in state else "ZeRO-partitioned optimizer state"
            raise RunError(f"this checkpoint holds {saved}: resume it with the trainer.zero_stage it was saved with")
        if self.zero is None:
            self.model.optimizer.load_state_dict(state["optimizer"])
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        names = {id(p): n for n, p in self.module.named_parameters()}
        for i, params in enumerate(self.zero.round_robin_bit16_groups):
            partition = self.zero.single_partition_of_fp32_groups[i]
            size = partition.numel()

            def own_slice(tensors: list[torch.Tensor]) -> torch.Tensor:
                flat = torch.cat([t.reshape(-1).float() for t in tensors])
                flat = torch.nn.functional.pad(flat, (0, size * world - flat.numel()))
                return flat[rank * size:(rank + 1) * size].to(partition.device)

            partition.data.copy_(own_slice([state["model"][names[id(p)]] for p in params]))
            keys = state["optimizer_state"][names[id(params[0])]].keys()
            if keys:  # saved before the first step, the optimizer had no state yet
                slot = {k: own_slice([state["optimizer_state"][names[id(p)]][k] for p in params]) for k in keys}
                self.zero.optimizer.state[partition] = {**slot, "step": state["optimizer_steps"][i].clone()}
        for field, value in state.get("loss_scaler", {}).items():
            setattr(self.zero.loss_scaler, field, type(getattr(self.zero.loss_scaler, field))(value))

    def _gather(self, partition: torch.Tensor) -> torch.Tensor:
        """The whole flat tensor of a ZeRO partition, from every rank's slice (a collective)."""
        parts = [torch.empty_like(partition) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, partition.contiguous())
        return torch.cat(parts).cpu()
