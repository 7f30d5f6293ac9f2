"""`slurmvision train --nproc N`: N ranks on this machine, the same trainer a Slurm task runs; or,
under torchrun or srun, the one rank this process was started as. `run_ranks` starts the ranks
(also those of `eval --nproc`)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from slurmvision.configs import Config, save_config
from slurmvision.errors import RunError, SlurmVisionError


def _rank_main(target: Callable, args: tuple, rank: int, nproc: int, port: int, queue) -> None:
    try:
        with _stdout_to_stderr():
            from slurmvision.trainer.distributed import DistEnv

            result = target(
                DistEnv(rank=rank, local_rank=rank, world_size=nproc, master_port=port, source="local"), *args
            )
        queue.put((rank, "ok", result))
    except SlurmVisionError as err:
        queue.put((rank, "user", f"{type(err).__name__}:{err}"))
        raise SystemExit(2) from None
    except BaseException:
        queue.put((rank, "bug", traceback.format_exc()))
        raise


def train_as_started(config: Config) -> tuple[dict, bool]:
    """This process as the one rank torchrun or srun started it as: its result, and whether it is rank 0."""
    from slurmvision.trainer.distributed import from_environment
    from slurmvision.trainer.entry import train

    env = from_environment()
    if env.is_main:
        save_config(config, Path(config.run.dir))
    with _stdout_to_stderr():
        return train(config, env), env.is_main


@contextlib.contextmanager
def _stdout_to_stderr():
    """The command's stdout carries its result (--json); whatever a rank or a library prints
    (DeepSpeed reports its op builds there) goes to stderr with the logs."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _train(env, config: Config) -> dict:
    from slurmvision.trainer.entry import train

    return train(config, env)


def train_here(config: Config, nproc: int = 1) -> dict:
    save_config(config, Path(config.run.dir))
    return run_ranks(_train, nproc, config)


def run_ranks(target: Callable, nproc: int, *args) -> Any:
    """`target(env, *args)` in `nproc` new processes, the ranks of one job on this machine (each one's
    DistEnv says where the rendezvous is); rank 0's result. `target` must be importable by name (the
    processes are spawned). A user error on any rank is raised here as that error; a rank that fails
    otherwise or dies without a word is a RuntimeError or a RunError."""
    from slurmvision.trainer.distributed import free_port

    if nproc < 1:
        raise RunError(f"--nproc {nproc}: give at least 1")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(target, args, r, nproc, port, queue)) for r in range(nproc)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, object]] = {}
    failed_at = None
    while len(outcomes) < nproc:
        try:
            rank, kind, payload = queue.get(timeout=1)
            outcomes[rank] = (kind, payload)
            if kind != "ok" and failed_at is None:
                failed_at = time.monotonic()
        except queue_module.Empty:
            # A rank killed without a word, or ranks stuck in a collective after another
            # rank failed: stop waiting for them.
            if not any(p.is_alive() for p in procs) or failed_at and time.monotonic() - failed_at > 20:
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join()
    return _result(outcomes, procs)


def _result(outcomes: dict, procs) -> dict:
    for kind, payload in outcomes.values():
        if kind == "user":
            name, _, message = payload.partition(":")
            from slurmvision import errors

            raise getattr(errors, name, SlurmVisionError)(message)
    for rank, (kind, payload) in sorted(outcomes.items()):
        if kind == "bug":
            raise RuntimeError(f"rank {rank} failed:\n{payload}")
    if len(outcomes) < len(procs):
        codes = {r: p.exitcode for r, p in enumerate(procs) if r not in outcomes}
        raise RunError(
            f"rank(s) {sorted(codes)} died without a result (exit codes {codes}); see the run's logs/ directory"
        )
    return outcomes[0][1]
