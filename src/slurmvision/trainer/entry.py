"""How one rank's process runs the Trainer: its log file, its device and process group, the run's lock,
and the ledger's record of a failure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from slurmvision.configs import Config
from slurmvision.errors import RunError
from slurmvision.slurm.causes import Outcome
from slurmvision.slurm.ledger import AttemptRecorder
from slurmvision.slurm.rundir import make_private
from slurmvision.trainer import distributed
from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.fastpath import use_run_compile_cache
from slurmvision.trainer.loop import Trainer
from slurmvision.trainer.monitor import setup_logging
from slurmvision.trainer.run_lock import run_lock

log = logging.getLogger("slurmvision.trainer")


def train(config: Config, env: Optional[DistEnv] = None) -> dict:
    """Entry point of one rank (a Slurm task, a submitit task or a `train --nproc` process)."""
    env = env or distributed.from_environment()
    run_dir = Path(config.run.dir)
    make_private()  # the run directory holds what later runs as its owner (slurmvision.slurm.rundir)
    setup_logging(env, run_dir / "logs" / f"rank-{env.rank:05d}.log")
    if config.model.compile:
        use_run_compile_cache(run_dir)
    try:
        device = distributed.init(env, config.cluster.gpus_per_node)
    except RunError as err:  # no GPU where the profile asks for them; before any collective, each rank stops alone
        log.error("%s", err)
        recorder = AttemptRecorder(run_dir, env.job_id, env.restart_count, enabled=env.is_main)
        recorder.ended(Outcome.FAILED, 0, error=failure(err))
        raise
    try:
        with run_lock(run_dir, env, device):  # one job per run directory, from before the resume to the end
            return _run(config, env, device)
    finally:
        distributed.shutdown()


def _run(config: Config, env: DistEnv, device: torch.device) -> dict:
    trainer = None
    try:
        trainer = Trainer(config, env, device)
        return trainer.fit()
    except Exception as err:
        if trainer is not None:  # for the coordinator: where and why it failed
            trainer.record.ended(Outcome.FAILED, trainer.step, error=failure(err))
        raise


def failure(err: Exception) -> str:
    """An error as the ledger keeps it, for the coordinator and `status`."""
    return f"{type(err).__name__}: {err}"[:2000]
