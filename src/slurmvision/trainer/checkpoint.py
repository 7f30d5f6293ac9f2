"""Atomic, verifiable checkpoints written by all ranks together, in the format of
`slurmvision.checkpoints` (its layout is described there).

The directory is built as `step-N.tmp/` and renamed into place; `latest` is then replaced
atomically. Files hold tensors and plain containers only, and are loaded with
`weights_only=True`. Rank 0 alone chooses the checkpoint a run resumes from
(`CheckpointManager.resume`).

`CheckpointManager.save` writes and commits before it returns. `async_checkpoint.AsyncCheckpointManager`
(trainer.async_checkpoint) writes the same files in a background thread and commits them by the same
steps (`_begin`, `_write`, `_failed`, `_agree_committed`), so with the same atomicity.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from slurmvision.checkpoints import (
    DELETING,
    LATEST,
    MANIFEST,
    META,
    STATE,
    Checkpoint,
    check_format,
    checkpoint_dirs,
    latest,
    leftovers,
    manifest_text,
    meta_text,
    rank_file,
    step_dir,
    verify,
)
from slurmvision.errors import CheckpointError
from slurmvision.trainer.checkpoint_files import Digests, fsync_dir, save_file, write_text
from slurmvision.trainer.distributed import DistEnv, agree, all_reduce_sum, barrier, broadcast_object

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def params_sha256(model_state: dict[str, torch.Tensor]) -> str:
    """A hash of a model's state dict, parameters and persistent buffers (BatchNorm statistics),
    by name in sorted order. Equal hashes mean bitwise equal models.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model_state.items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()


def weights_facts(shared: dict) -> dict:
    """The meta record's facts about the weights in state.pt (`CheckpointManager(describe=...)`)."""
    return {"params_sha256": params_sha256(shared["engine"]["model"])}


def rng_state() -> dict:
    """Every RNG of this process as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss), cached)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Written:
    """What one rank's write of a checkpoint produced."""

    digests: Digests
    facts: dict  # rank 0: `describe(shared)`, for the meta record
    seconds: float


@dataclass(frozen=True)
class Writes:
    """Agreed on the way to a commit: the ranks still writing their files, and those whose write failed."""

    writing: float
    failed: float


@dataclass
class Resumed:
    checkpoint: Checkpoint
    shared: dict  # state.pt: model, optimizer, step, data position, config
    own: Optional[dict]  # this rank's file (RNG states); None after a change of world size


class CheckpointManager:
    def __init__(
        self,
        directory: str | Path,
        env: DistEnv,
        keep: int,
        device: torch.device = CPU,
        describe: Callable[[dict], dict] = lambda shared: {},
    ):
        """`describe(shared)`: facts for the meta record computed from the state as written (a hash
        of the weights), on rank 0, in the background for an async save."""
        self.dir = Path(directory)
        self.env, self.keep, self.device, self.describe = env, keep, device, describe
        self._deleter: Optional[threading.Thread] = None  # deleting what the last save pruned (`_prune`)

    def candidates(self) -> list[Path]:
        return checkpoint_dirs(self.dir)

    def latest_valid(self) -> Optional[Checkpoint]:
        """The newest checkpoint that verifies as this process sees it; broken newer ones are skipped with a warning."""
        return latest(self.dir)

    def resume(self) -> Optional[Resumed]:
        """Collective: the checkpoint to resume from, loaded on every rank (None: start afresh).

        Rank 0 alone chooses, and broadcasts its choice. Ranks may see the directory differently
        (a listing an NFS client still caches, a run directory on node-local disks); ranks that
        each chose would resume from different steps and train on as one run. A rank that cannot
        read rank 0's choice stops every rank, with the same message.
        """
        chosen = self.latest_valid() if self.env.is_main else None
        name, meta = broadcast_object((chosen.path.name, chosen.meta) if chosen else (None, None))
        if name is None:
            return None
        checkpoint, error = Checkpoint(self.dir / name, meta), None
        check_format(meta, checkpoint.path)  # on every rank alike: the meta record is rank 0's
        try:
            shared = checkpoint.load_state()
            own = checkpoint.load_rank(self.env.rank) if meta["world_size"] == self.env.world_size else None
        except (OSError, RuntimeError) as err:  # torch.load raises RuntimeError on a file cut short
            error = err
        (failed,) = all_reduce_sum([float(error is not None)], self.device)
        if failed:
            reason = f"{error} on this rank" if error else f"it failed on {int(failed)} other rank(s)"
            raise CheckpointError(
                f"cannot resume from {checkpoint.path}, the newest valid checkpoint rank 0 sees: "
                f"{reason}. Every node must see the run directory alike: put it on a file system "
                f"they share, not on node-local disks"
            )
        return Resumed(checkpoint, shared, own)

    def save(self, step: int, shared: dict, per_rank: dict, meta: dict) -> Path:
        """Collective: every rank calls it. Rank 0 writes the shared state and commits."""
        tmp, written, error = self._begin(step), None, None
        try:
            written = self._write(tmp, shared, per_rank)
        except OSError as err:  # a full disk or quota, a vanished file system
            error = err
        writes = agree(Writes, self.device, writing=False, failed=error is not None)
        if writes.failed:
            raise CheckpointError(self._failed(step, tmp, error, writes) + ", then resume")
        return self._agree_committed(step, tmp, meta, written)

    def _begin(self, step: int) -> Path:
        """Collective: an empty `step-N.tmp/`, made by rank 0."""
        tmp = step_dir(self.dir, step, tmp=True)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        return tmp

    def _write(self, tmp: Path, shared: dict, per_rank: dict) -> Written:
        """This rank's files of the checkpoint, and on rank 0 the shared state, fsynced and hashed."""
        started = time.monotonic()
        digests = {rank_file(self.env.rank): save_file(per_rank, tmp / rank_file(self.env.rank))}
        facts = {}
        if self.env.is_main:
            # `describe` hashes the weights while they are written (it only reads them; both release the GIL).
            with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-describe") as pool:
                described = pool.submit(self.describe, shared)
                digests[STATE] = save_file(shared, tmp / STATE)
                facts = described.result()
        return Written({name: d for name, d in digests.items() if d}, facts, time.monotonic() - started)

    def _failed(self, step: int, tmp: Path, error: Optional[BaseException], writes: Writes) -> str:
        """After a failed write on some rank (every rank learns of it: none may wait in a barrier for a
        save that will not come, none may commit a checkpoint that misses a rank's file): the
        directory removed, and what happened, as every rank reports it."""
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = self.candidates()
        if isinstance(error, OSError):
            reason = f"{error.strerror or error} on this rank"
        elif error is not None:
            reason = f"{type(error).__name__}: {error} on this rank"
        else:
            reason = f"it failed on {int(writes.failed)} other rank(s)"
        return (
            f"could not write checkpoint {step_dir(self.dir, step).name}: {reason}. Nothing was replaced: "
            f"{kept[0].name if kept else 'no earlier checkpoint'} is still the newest. "
            f"Free space in {self.dir} (or lower trainer.keep_checkpoints)"
        )

    def _agree_committed(self, step: int, tmp: Path, meta: dict, written: Optional[Written]) -> Path:
        """Collective, once every rank wrote its files: rank 0 commits; every rank learns whether it could."""
        final, error = step_dir(self.dir, step), None
        if self.env.is_main:
            try:
                self._commit(tmp, final, {**meta, **written.facts}, written.digests)
            except OSError as err:
                error = err
        (failed,) = all_reduce_sum([float(error is not None)], self.device)
        if failed:
            reason = f"{error.strerror or error}" if error else "it failed on rank 0"
            raise CheckpointError(
                f"could not commit checkpoint {final.name}: {reason}. Free space in {self.dir} "
                "(or lower trainer.keep_checkpoints)"
            )
        return final

    def _commit(self, tmp: Path, final: Path, meta: dict, digests: Digests) -> None:
        write_text(tmp / META, meta_text(meta))
        write_text(tmp / (MANIFEST + ".tmp"), manifest_text(tmp, digests))
        os.replace(tmp / (MANIFEST + ".tmp"), tmp / MANIFEST)
        fsync_dir(tmp)
        # From here `tmp` is a checkpoint (checkpoints.checkpoint_dirs). A step saved again (its old
        # copy did not verify) replaces the old copy only now, by renames, never by deleting the
        # only valid copy first: a SIGKILL at any point leaves one, even with keep_checkpoints=1.
        if final.exists():
            old = final.with_name(final.name + ".old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        write_text(self.dir / (LATEST + ".tmp"), final.name + "\n")
        os.replace(self.dir / (LATEST + ".tmp"), self.dir / LATEST)
        fsync_dir(self.dir)
        self._prune(final)

    def _prune(self, committed: Path) -> None:
        """Keep the `keep` newest complete checkpoints from `committed` down; remove the rest and
        what killed saves left. Newer ones (which the resume found broken) are left to be replaced
        when the run saves their step again; counted, they could push out the last valid one.

        Each doomed directory is renamed out of the checkpoints at once (`leftovers`) and deleted by a
        background thread: unlinking a few hundred MiB took a quarter of a save's time, with training
        waiting on it."""
        found = self.candidates()
        newer, older = found[: found.index(committed)], found[found.index(committed) :]
        # Sizes, not hashes: hashing every kept checkpoint on each save would cost minutes on
        # large models. Loading still verifies hashes.
        kept = set(newer + [path for path in older if verify(path, hashes=False) is None][: self.keep])
        doomed = [_set_aside(path) for path in leftovers(self.dir, kept)]
        self.wait_pruned()  # one deleter at a time; the previous one is long done by the next save
        if not doomed:
            return
        # Not a daemon: a process that ends normally deletes them first; one killed leaves them to the next save.
        self._deleter = threading.Thread(target=_delete, args=(doomed,), name="checkpoint-prune")
        self._deleter.start()

    def wait_pruned(self) -> None:
        """Wait until the checkpoints the last save pruned are deleted (the end of a run, a stop)."""
        deleter, self._deleter = self._deleter, None
        if deleter is not None:
            deleter.join()


def _set_aside(path: Path) -> Path:
    """`path` renamed to a name no listing of checkpoints takes for one (a single atomic step)."""
    if path.name.endswith(DELETING):
        return path
    aside = path.with_name(path.name + DELETING)
    try:
        os.replace(path, aside)
    except OSError:  # a killed deleter left that name: delete this one in place
        return path
    return aside


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
