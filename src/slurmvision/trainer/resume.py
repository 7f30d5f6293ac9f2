"""Resuming a run: the newest valid checkpoint loaded into the engine, the EMA and this rank's
RNGs, after a check that it was trained with the same config; `resume` returns what it restored."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from slurmvision.configs import Config, to_dict
from slurmvision.configs.compare import meaningful_changes
from slurmvision.errors import CheckpointError
from slurmvision.shards.reader import LoaderState
from slurmvision.trainer.checkpoint import CheckpointManager, set_rng_state
from slurmvision.trainer.engine import Engine

log = logging.getLogger("slurmvision.trainer")


def seed_everything(*entropy: int) -> None:
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Restored:
    """Where training continues: the start of the run, or a checkpoint's step."""

    step: int = 0
    samples_seen: int = 0
    loader: Optional[LoaderState] = None  # the data position; None: the start of the data
    checkpoint: Optional[str] = None  # the directory resumed from
    save_s: float = 0.0  # what the last attempt measured: a stop soon after this restart plans with it
    eval_s: float = 0.0


def resume(
    checkpoints: CheckpointManager,
    engine: Engine,
    ema: Optional[torch.nn.Module],
    config: Config,
    rank: int,
    global_batch: int,
) -> Restored:
    """Collective: restore the newest valid checkpoint, or seed this rank's RNGs for a fresh start.

    `global_batch` is this attempt's (Config.grad_accum_at): a checkpoint trained with another is refused.
    """
    resumed = checkpoints.resume()
    if resumed is None:
        seed_everything(config.trainer.seed, 1, rank)
        return Restored()
    checkpoint, shared = resumed.checkpoint, resumed.shared
    check_config(
        config, json.loads(shared["config"]), int(shared.get("global_batch", 0)), global_batch, checkpoint.path
    )
    engine.load_state_dict(shared["engine"])
    if ema is not None and "ema" in shared:
        ema.module.load_state_dict(shared["ema"])
    step = int(shared["step"])
    if resumed.own is not None:
        set_rng_state(resumed.own["rng"])
    else:  # a new world size: ranks draw fresh, still reproducible, random streams
        seed_everything(config.trainer.seed, 2, step, rank)
    log.info("resumed from %s (step %d)", checkpoint.path, step)
    return Restored(
        step=step,
        samples_seen=int(shared["samples_seen"]),
        loader=LoaderState.from_dict(shared["loader"]),
        checkpoint=str(checkpoint.path),
        save_s=float(checkpoint.meta.get("last_save_s", 0.0)),
        eval_s=float(checkpoint.meta.get("last_eval_s", 0.0)),
    )


def check_config(config: Config, saved: dict, saved_global_batch: int, global_batch: int, path: Path) -> None:
    changes = meaningful_changes(saved, to_dict(config))
    if saved_global_batch and saved_global_batch != global_batch:
        changes.append(f"global batch (batch_size x ranks x grad_accum): {saved_global_batch} -> {global_batch}")
    if not changes:
        return
    if config.trainer.allow_config_change:
        log.warning("resuming %s with config changes (allowed): %s", path, "; ".join(changes))
        return
    raise CheckpointError(
        f"the config differs from the one {path} was trained with: {'; '.join(changes)}. "
        "Undo the changes (for fewer ranks raise trainer.grad_accum to keep the global batch), "
        "use a new --run-dir, or pass trainer.allow_config_change=true"
    )
