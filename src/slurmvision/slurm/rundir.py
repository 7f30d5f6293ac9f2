"""Run directories other users cannot turn into code running as the run's owner.

A run directory holds what later runs as its owner on compute nodes: submitit's pickled job
in RUN/slurm/ (unpickled by every attempt), the batch scripts, the checkpoints every attempt
loads, the config and the ledger the coordinator resubmits from. On a cluster's group-
writable project directories, whoever can write there (or swap a sub-directory for a
symlink) could run code as the owner. So everything slurmvision creates in a run directory
is private (umask 077), and before a submission and before each attempt unpickles anything,
the run directory and those paths are checked: owned by the user, not writable by group or
others, no symlink leading out of the run directory. The run directory's own path may go
through symlinks (`runs -> /scratch/me/runs`): it is resolved first.

Torch-free: it runs on the login node and at the start of each job, before submitit.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Iterator

from slurmvision.errors import RunError

PRIVATE_UMASK = 0o077
# What an attempt or the coordinator executes or loads; logs, TensorBoard and eval output are only written.
GUARDED = ("slurm", "checkpoints", "ledger", "config.yaml")


class UnsafeRunDir(RunError):
    """A run directory (or a path in it) that someone else could write."""


def make_private() -> None:
    """From now on this process creates files 0600 and directories 0700, whatever the user's umask.
    Slurm hands the submitting process's umask to the job (SLURM_UMASK): its logs are private too."""
    os.umask(PRIVATE_UMASK)


def _guarded_paths(root: Path) -> Iterator[Path]:
    yield root
    for name in GUARDED:
        path = root / name
        if not os.path.lexists(path):
            continue
        yield path
        if path.is_dir() and not path.is_symlink():
            for folder, dirs, files in os.walk(path):  # does not follow symlinks: each is checked itself
                yield from (Path(folder) / entry for entry in (*dirs, *files))


def problem(path: Path, root: Path) -> str | None:
    """What makes `path` unsafe, with the fix; None if it is safe."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        if target != root and root not in target.parents:
            return f"{path} is a symlink to {target}, outside the run directory: remove it (rm {path})"
        return None
    if info.st_uid != os.getuid():
        return (
            f"{path} belongs to uid {info.st_uid}, not to you: a run directory must be yours alone; "
            f"start the run again in a directory you own (--run-dir)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others: chmod -R go-w {path}"
    return None


def check_run_dir(run_dir: str | Path) -> None:
    """Raise UnsafeRunDir naming the first unsafe path and its fix. A missing run directory is
    fine (it is about to be created, private)."""
    root = Path(run_dir).resolve()
    if not root.exists():
        return
    for path in _guarded_paths(root):
        reason = problem(path, root)
        if reason:
            raise UnsafeRunDir(
                f"unsafe run directory, nothing was started: {reason} (anyone who can write there "
                f"could run code as you through this run)"
            )


def main(argv: list[str]) -> int:
    """`python -P -m slurmvision.slurm.rundir RUN`: the check each attempt runs before submitit
    unpickles the job. A refusal is printed to the job's log and recorded in the ledger."""
    try:
        check_run_dir(argv[0])
    except UnsafeRunDir as err:
        print(f"slurmvision: error: {err}", file=sys.stderr)
        from slurmvision.slurm.ledger import LEDGER_DIR, Ledger

        # Recorded unless the ledger is what is unsafe (a symlink would take the record elsewhere).
        root = Path(argv[0]).resolve()
        if all(problem(path, root) is None for path in (root, root / LEDGER_DIR) if os.path.lexists(path)):
            try:
                Ledger(root, writer="job").event("job", f"job {os.environ.get('SLURM_JOB_ID', '?')} refused: {err}")
            except OSError:
                pass  # the log has the reason
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
