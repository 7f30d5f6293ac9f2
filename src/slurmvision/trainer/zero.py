"""How ZeRO lays the fp32 master weights and the optimizer state out over the ranks, read and
written so that checkpoints do not depend on the world size.

DeepSpeed has no public API for this: the layouts read private attributes of its ZeRO
optimizers (`round_robin_bit16_groups`, `single_partition_of_fp32_groups`, `fp16_groups`,
`fp32_partitioned_groups_flat`, a parameter's `ds_tensor`, `ds_numel`, `ds_shape`). They are
known to be what this module expects in the tested versions; `check_version` refuses others at
start-up rather than letting a renamed attribute corrupt a checkpoint.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from slurmvision.errors import RunError

# From the version the dev environment pins (requirements/constraints.txt) to the next minor release.
TESTED_DEEPSPEED = ("0.19.8", "0.20")
Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's slice of a partition, on rank 0


def check_version(version: str) -> None:
    from packaging.version import Version

    low, high = TESTED_DEEPSPEED
    if not Version(low) <= Version(version) < Version(high):
        raise RunError(
            f"DeepSpeed {version} is not a version slurmvision was tested with (>={low},<{high}): "
            f"its ZeRO checkpoints read DeepSpeed's private partition layout. Install "
            f"'deepspeed>={low},<{high}', or use trainer.engine=ddp"
        )


def _pad(flat: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(flat, (0, size - flat.numel()))


class FlatPartitions:
    """ZeRO 1 and 2: every rank holds the whole weights; a group's fp32 master weights and
    optimizer state are flattened into one buffer, cut into equal slices, one per rank. (Without
    ZeRO, `zero=None`, its methods for the weights alone still apply.)"""

    def __init__(self, zero):
        self.zero = zero

    def groups(self) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
        """(parameters, this rank's flat fp32 partition of them) for each ZeRO group."""
        return list(zip(self.zero.round_robin_bit16_groups, self.zero.single_partition_of_fp32_groups))

    def split(self, params: list[torch.nn.Parameter], slices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every parameter's full tensor from all ranks' flat partitions, in the group's order."""
        flat, offset, fulls = torch.cat(slices), 0, []
        for param in params:
            fulls.append(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()
        return fulls

    def own_slice(
        self, params: list[torch.nn.Parameter], fulls: list[torch.Tensor], partition: torch.Tensor
    ) -> torch.Tensor:
        """This rank's flat partition of the given full tensors (the inverse of `split`)."""
        rank, world, size = dist.get_rank(), dist.get_world_size(), partition.numel()
        flat = _pad(torch.cat([t.reshape(-1).float() for t in fulls]), size * world)
        return flat[rank * size : (rank + 1) * size].to(partition.device)

    def model_state(self, module: torch.nn.Module, everywhere: bool = True) -> dict:
        return module.state_dict()

    def checkpoint_weights(self, module: torch.nn.Module, gather: Gather) -> dict:
        """The full fp32 master weights, gathered to rank 0 ({} elsewhere; a collective)."""
        names = {id(p): n for n, p in module.named_parameters()}
        model = {}
        for params, partition in self.groups():
            slices = gather(partition)
            if slices:
                model.update((names[id(p)], full.clone()) for p, full in zip(params, self.split(params, slices)))
        if dist.get_rank() != 0:
            return {}
        # Frozen parameters and buffers are not in the optimizer's groups.
        return {n: model.get(n, t).cpu() for n, t in module.state_dict().items()}

    def load_weights(self, module: torch.nn.Module, model: dict) -> None:
        module.load_state_dict(model)

    def eval_module(
        self, module: torch.nn.Module, build: Callable[[], torch.nn.Module], device: torch.device
    ) -> torch.nn.Module:
        return module


class ParameterPartitions:
    """ZeRO-3: every parameter is cut into equal (padded) slices, and a rank's partition of a
    group concatenates its slices; no rank holds the whole weights outside a gather."""

    def __init__(self, zero):
        self.zero = zero

    def groups(self) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
        return list(zip(self.zero.fp16_groups, self.zero.fp32_partitioned_groups_flat))

    def split(self, params: list[torch.nn.Parameter], slices: list[torch.Tensor]) -> list[torch.Tensor]:
        fulls, offset = [], 0
        for param in params:
            size = param.ds_tensor.numel()
            fulls.append(torch.cat([s[offset : offset + size] for s in slices])[: param.ds_numel].view(param.ds_shape))
            offset += size
        return fulls

    def own_slice(
        self, params: list[torch.nn.Parameter], fulls: list[torch.Tensor], partition: torch.Tensor
    ) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        pieces = []
        for param, full in zip(params, fulls):
            size = param.ds_tensor.numel()
            pieces.append(_pad(full.reshape(-1).float(), size * world)[rank * size : (rank + 1) * size])
        return _pad(torch.cat(pieces), partition.numel()).to(partition.device)

    def model_state(self, module: torch.nn.Module, everywhere: bool = True) -> dict:
        """The full model state dict; with `everywhere=False` only rank 0 gets it (a collective:
        gathered one parameter at a time)."""
        import deepspeed

        keep = everywhere or dist.get_rank() == 0
        params = dict(module.named_parameters())
        # The buffers as they are: ZeRO-3 partitions only the parameters.
        state = {n: t.detach().clone().cpu() for n, t in module.state_dict().items() if keep and n not in params}
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param]):
                if keep:
                    state[name] = param.detach().clone().cpu()
        return state

    def checkpoint_weights(self, module: torch.nn.Module, gather: Gather) -> dict:
        return self.model_state(module, everywhere=False)

    def load_weights(self, module: torch.nn.Module, model: dict) -> None:
        import deepspeed

        params = dict(module.named_parameters())
        missing = params.keys() - model.keys()
        if missing:
            raise RunError(f"the checkpoint lacks weights of this model: {', '.join(sorted(missing)[:5])}")
        # One parameter at a time: leaving the context re-partitions the loaded weights.
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(model[name])
        module.load_state_dict({n: t for n, t in model.items() if n not in params}, strict=False)

    def eval_module(
        self, module: torch.nn.Module, build: Callable[[], torch.nn.Module], device: torch.device
    ) -> torch.nn.Module:
        """Ranks evaluate different numbers of batches, which ZeRO-3's per-layer gathers cannot:
        a full copy built with `build()`."""
        copy = build()
        copy.load_state_dict(self.model_state(module))
        return copy.to(device)
