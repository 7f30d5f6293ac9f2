"""One job trains a run directory at a time, whatever started it (`launch --force`, a job
requeued while a lost one still runs, `train` by hand, an srun): rank 0 holds an exclusive
POSIX lock (`lockf`) on RUN/train.lock for the whole of `train()`.

A POSIX lock belongs to its process and goes with it however that ends (SIGKILL included): no
stale lock to clean up. Unlike a flock it is not shared with forked children, so a loader
worker that outlives a killed rank 0 (seen on a cluster without cgroup process tracking) does
not keep the run locked. NFS and Lustre (mounted with flock) lock it across hosts. The file's
text only says who holds it, for the message of the job that is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional

import torch

from slurmvision.errors import RunError
from slurmvision.trainer.distributed import DistEnv, all_reduce_sum

log = logging.getLogger("slurmvision.trainer")
LOCK_NAME = "train.lock"


def holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


def _take(path: Path, env: DistEnv) -> tuple[Optional[IO], bool]:
    """(the locked file, or None; whether another process holds the lock).

    A lock that cannot be had for another reason than its holder (ENOLCK: NFS without a lock
    manager; ENOSYS: Lustre mounted without flock) costs a warning, never the run: the lock only
    guards against a mistake (a second job in the same run directory), and refusing would make
    such a file system unusable for training, where checkpoints work as well as anywhere.
    """
    try:
        f = open(path, "a+")
    except OSError as err:
        log.warning("cannot open the run lock %s (%s): training without it", path, err)
        return None, False
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        f.close()
        return None, True
    except OSError as err:
        f.close()
        log.warning(
            "cannot lock %s (%s): training without the guard against a second job in this run directory", path, err
        )
        return None, False
    f.truncate(0)  # "a+": the write below lands at the new end, the start
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"job {env.job_id or '-'} on {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
    f.flush()
    return f, False


@contextmanager
def run_lock(run_dir: Path, env: DistEnv, device: torch.device) -> Iterator[None]:
    """Rank 0 takes the lock; every rank learns the outcome from one all-reduce, right after the
    process group starts, and all raise together: none waits in a collective for a rank 0 that left."""
    path = Path(run_dir) / LOCK_NAME
    held, taken_by_another = _take(path, env) if env.is_main else (None, False)
    try:
        if all_reduce_sum([float(taken_by_another)], device)[0]:
            raise RunError(
                f"another job is training {run_dir} ({holder(path)}): two jobs would overwrite each other's "
                f"checkpoints. Wait for it to end or cancel it, then start this one again"
            )
        yield
    finally:
        if held is not None:
            held.close()  # and with it the lock
