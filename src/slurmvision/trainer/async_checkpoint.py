"""Checkpoints written in the background (trainer.async_checkpoint): `AsyncCheckpointManager`.

`save_async` copies the state to host memory and returns; a background thread of each rank writes that
rank's files, and `settle`, called by every rank at the same step boundaries, commits the checkpoint once
every rank's write is done: the same files, manifest and renames as `CheckpointManager.save`, so the same
atomicity. The ranks agree on it by an all-reduce of "written / still writing / failed" at a step boundary,
where every collective of the loop happens: no collective runs in a background thread, and a rank that
dies stops the others at the next boundary as it would without a background write.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from slurmvision.errors import CheckpointError
from slurmvision.trainer.checkpoint import CheckpointManager, Writes
from slurmvision.trainer.distributed import agree

log = logging.getLogger(__name__)


def host_copy(state: Any) -> Any:
    """`state` with every tensor copied to host memory (pinned, for device tensors) and every
    container rebuilt: training can go on changing the original while the copy is written. A
    tensor that appears twice (tied weights) is copied once and stays shared."""
    copies: dict[tuple, torch.Tensor] = {}
    from_device = False

    def copy(value: Any) -> Any:
        nonlocal from_device
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.dtype, value.shape, value.stride(), value.device)
            if key not in copies:
                if value.device.type == "cpu":
                    copies[key] = value.detach().clone()
                else:  # one synchronisation for all of them, below
                    pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
                    copies[key] = pinned.copy_(value.detach(), non_blocking=True)
                    from_device = True
            return copies[key]
        if isinstance(value, dict):
            copied = type(value)((k, copy(v)) for k, v in value.items())
            # A module's state_dict keeps its modules' versions in `_metadata`, which loading reads.
            for name, attribute in getattr(value, "__dict__", {}).items():
                setattr(copied, name, copy(attribute))
            return copied
        if isinstance(value, (list, tuple)):
            items = [copy(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
        return value

    copied = copy(state)
    if from_device and torch.cuda.is_available():
        torch.cuda.synchronize()
    return copied


@dataclass(frozen=True)
class Settled:
    """How a background save ended, the same on every rank."""

    step: int
    path: Optional[Path]  # the committed checkpoint; None if it failed
    error: Optional[str]  # why it failed: the previous checkpoint is still the newest
    seconds: float  # from the call to save_async to this rank's files written


@dataclass(frozen=True)
class _Pending:
    step: int
    tmp: Path
    meta: dict
    write: Future  # of Written
    blocked_s: float  # what save_async took: the copy to host memory and the empty directory


class AsyncCheckpointManager(CheckpointManager):
    """A CheckpointManager that can also save in the background, one save at a time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: Optional[_Pending] = None
        self.failures = 0  # background saves failed in a row

    def save(self, step: int, shared: dict, per_rank: dict, meta: dict) -> Path:
        """As CheckpointManager.save, once no background save is pending (settle it first)."""
        self._check_none_pending()
        return super().save(step, shared, per_rank, meta)

    def save_async(self, step: int, shared: dict, per_rank: dict, meta: dict) -> None:
        """Collective: the state copied to host memory, then written by a background thread of
        every rank; `settle` commits it. Training may change the given state once this returns."""
        self._check_none_pending()
        started = time.monotonic()
        shared = host_copy(shared) if self.env.is_main else {}
        per_rank = host_copy(per_rank)
        tmp, write = self._begin(step), Future()

        def background() -> None:
            try:
                write.set_result(self._write(tmp, shared, per_rank))
            except BaseException as err:
                write.set_exception(err)

        # A daemon: a process that exits (an error elsewhere) abandons the write, whose step-N.tmp never counts.
        threading.Thread(target=background, name=f"checkpoint-writer-{step}", daemon=True).start()
        self._pending = _Pending(step, tmp, meta, write, time.monotonic() - started)

    @property
    def pending(self) -> Optional[int]:
        """The step whose background save is not settled yet."""
        return self._pending.step if self._pending else None

    def settle(self, wait: bool = False) -> Optional[Settled]:
        """Collective while a background save is pending (then every rank has one: saves are collective).

        Without `wait`, None while some rank is still writing; else (after this rank's write is done)
        the save committed by rank 0, or failed on every rank alike with the previous checkpoint
        still the newest. A failure is logged on every rank and training may go on; a second one in
        a row raises the CheckpointError a synchronous save would have raised.
        """
        pending = self._pending
        if pending is None:
            return None
        written, error = None, None
        if wait or pending.write.done():
            try:
                written = pending.write.result()
            except Exception as err:  # in the background a programming error, too, is a failed write
                error = err
        writes = agree(Writes, self.device, writing=written is None and error is None, failed=error is not None)
        if writes.writing:  # a failure, too, waits for every rank's thread to be done with the directory
            return None
        self._pending, path, problem = None, None, None
        if writes.failed:
            problem = self._failed(pending.step, pending.tmp, error, writes)
        else:
            try:
                path = self._agree_committed(pending.step, pending.tmp, pending.meta, written)
            except CheckpointError as err:
                problem = str(err)
        if problem is None:
            self.failures = 0
            return Settled(pending.step, path, None, pending.blocked_s + written.seconds)
        self.failures += 1
        if self.failures >= 2:
            raise CheckpointError(f"{problem}, then resume ({self.failures} background checkpoints failed in a row)")
        problem += "; training goes on, and the next checkpoint tries again"
        log.error("%s", problem)
        return Settled(pending.step, None, problem, 0.0)

    def _check_none_pending(self) -> None:
        if self._pending is not None:
            raise RuntimeError(f"the background save of step {self._pending.step} is pending: settle it first")
