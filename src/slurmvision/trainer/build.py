"""The pieces a Trainer is built from, each from the config: the models before the resume (which
loads into them), then the data and the attempt's record from where the resume left training."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from slurmvision.configs import Config, ModelConfig
from slurmvision.models import build_model, build_teacher
from slurmvision.shards.reader import LoaderState, TrainReader
from slurmvision.shards.synthetic import SyntheticReader
from slurmvision.slurm.ledger import AttemptRecorder
from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.engine import Engine, build_engine
from slurmvision.trainer.prefetch import DeviceBatches, Reader
from slurmvision.trainer.resume import Restored, seed_everything

log = logging.getLogger("slurmvision.trainer")


class Models(NamedTuple):
    model: torch.nn.Module
    engine: Engine
    teacher: Optional[torch.nn.Module]  # model.distill.teacher, on the device
    ema: Optional[torch.nn.Module]  # timm's ModelEmaV3, with model.ema_decay


def build_models(config: Config, num_classes: int, device: torch.device, local_rank: int, grad_accum: int) -> Models:
    seed_everything(config.trainer.seed, 0)  # the same initial weights on every rank
    model = build_model(config.model, num_classes)
    engine = build_engine(model, config, device, local_rank, grad_accum=grad_accum)
    distill = config.model.distill
    teacher = build_teacher(distill, num_classes).to(device) if distill.teacher else None
    ema = None
    if config.model.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.model.ema_decay)
    return Models(model, engine, teacher, ema)


def empty_model(model: ModelConfig, num_classes: int) -> torch.nn.Module:
    """The model's architecture, without downloading or loading weights or drawing from the run's RNG."""
    with torch.random.fork_rng(devices=[]):
        return build_model(dataclasses.replace(model, pretrained=False, finetune_from=None), num_classes)


def build_data(
    config: Config, env: DistEnv, device: torch.device, num_classes: int, loader: Optional[LoaderState]
) -> tuple[Reader, DeviceBatches]:
    """This rank's training batches from the data position `loader` (None: the start of the data)."""
    where = dict(
        seed=config.trainer.seed,
        rank=env.rank,
        world_size=env.world_size,
        state=loader,
        pin_memory=device.type == "cuda",
    )
    if config.data.synthetic:  # random batches in memory: the loop's own speed (shards.synthetic)
        reader = SyntheticReader(config.data, num_classes, **where)
        log.info("data.synthetic: training on random batches held in memory, without evaluation")
    else:
        reader = TrainReader(config.data, **where)
    # On CUDA the next batch's copy to the GPU goes out before this step's compute (data.prefetch_to_device).
    ahead = config.data.prefetch_to_device and device.type == "cuda"
    return reader, DeviceBatches(reader, device, ahead=ahead)


def persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a forward pass changes and a checkpoint keeps (BatchNorm statistics): a step cut short
    puts them back."""
    persistent = model.state_dict().keys()
    return [b for name, b in model.named_buffers() if name in persistent]


def start_record(
    run_dir: Path, env: DistEnv, config: Config, restored: Restored, grad_accum: int, global_batch: int
) -> AttemptRecorder:
    """The ledger's record of this attempt, started; an elastic run on fewer ranks than planned says how
    it keeps the global batch."""
    record = AttemptRecorder(run_dir, env.job_id, env.restart_count, enabled=env.is_main)
    record.started(world_size=env.world_size, step=restored.step, checkpoint=restored.checkpoint)
    if env.world_size != config.cluster.world_size and config.cluster.elastic:
        resized = f"{env.world_size} of {config.cluster.world_size} planned ranks"
        log.warning(
            "training on %s: %d micro-batches per step instead of %d keep the global batch of %d",
            resized,
            grad_accum,
            config.trainer.grad_accum,
            global_batch,
        )
        record.note(f"{resized}, gradient accumulation {grad_accum} (global batch {global_batch})")
    return record
