"""The DeepSpeed engine: ZeRO stage 0/1/2, fp32 or bf16 (autocast), behind the loop's engine
interface (see trainer.engine).

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
        # bf16 through torch autocast inside DeepSpeed's forward: fp32 weights, as with DDP.
        # (DeepSpeed's own bf16 casts the weights but not the buffers, which breaks models
        # such as Swin V2 whose attention uses fp32 coordinate tables.)
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
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
        if trainer.precision == "fp16":
            raise ConfigError("trainer.precision=fp16 is not supported with trainer.engine=deepspeed: use "
                              "trainer.precision=bf16 (A100 and newer), or fp16 with trainer.engine=ddp")
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
        yield  # DeepSpeed's forward applies the autocast of its config; accumulation is the loop's

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
        return None  # fp32 weights: no loss scaling

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
        return {"model": model, "optimizer_state": moments, "optimizer_steps": steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
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

    def _gather(self, partition: torch.Tensor) -> torch.Tensor:
        """The whole flat tensor of a ZeRO partition, from every rank's slice (a collective)."""
        parts = [torch.empty_like(partition) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, partition.contiguous())
        return torch.cat(parts).cpu()
