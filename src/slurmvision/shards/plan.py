"""Which sample every rank, worker and batch reads: a pure function of the inputs.

The plan of an epoch depends only on the shard sizes, the seed, the epoch, the world size
and the batch schedule, never on timing or on the number of loader workers. That is what
makes resume exact: the loader state is just (epoch, batches done per world-size segment).

Policy (documented for users):
- An epoch is the shards in a seeded random order, concatenated. Each rank takes an equal
  contiguous slice (the last `N mod world` samples of that order sit the epoch out; which
  ones changes every epoch), shuffled within windows of `shuffle_buffer` samples.
- Every rank therefore has the same number of samples and, because batch sizes are drawn
  from (seed, epoch, batch index) identically on all ranks, the same number of batches:
  DDP never waits at an epoch's end. The last batch may be smaller; it is the same size
  on every rank.
- Resuming on another world size replays what the earlier segments consumed and plans
  the rest of the epoch over the new ranks: no sample of the epoch lost or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from slurmvision.errors import DataError

# Stream tags keep the random draws of different purposes independent.
_SHARD_ORDER, _WINDOW, _SCALE = 1, 2, 3


def rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


@dataclass(frozen=True)
class BatchSchedule:
    """Resolution and batch size of each batch, drawn from (seed, epoch, batch index)."""

    resolutions: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # one per resolution
    seed: int

    def choice(self, epoch: int, batch: int) -> int:
        if len(self.resolutions) == 1:
            return 0
        return int(rng(self.seed, epoch, batch, _SCALE).integers(len(self.resolutions)))

    def batches(self, epoch: int, first_batch: int, stream_len: int) -> list[tuple[int, int, int]]:
        """(start, size, resolution) of every batch of a stream of `stream_len` samples."""
        out, start, batch = [], 0, first_batch
        while start < stream_len:
            i = self.choice(epoch, batch)
            size = min(self.batch_sizes[i], stream_len - start)
            out.append((start, size, self.resolutions[i]))
            start += size
            batch += 1
        return out


def epoch_order(counts: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Global sample ids (offset of the shard + index in it) in the epoch's shard order."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = rng(seed, epoch, _SHARD_ORDER).permutation(len(counts))
    parts = [np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in order]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rank_stream(
    pool: np.ndarray, world: int, rank: int, *, seed: int, epoch: int, segment: int, window: int
) -> np.ndarray:
    """Rank's equal contiguous slice of `pool`, shuffled within windows."""
    per_rank = len(pool) // world
    stream = pool[rank * per_rank : (rank + 1) * per_rank].copy()
    for start in range(0, per_rank, window):
        rng(seed, epoch, segment, rank, start, _WINDOW).shuffle(stream[start : start + window])
    return stream


@dataclass
class RankPlan:
    stream: np.ndarray  # global sample ids this rank reads in this segment, in order
    batches: list[tuple[int, int, int]]  # (start in stream, size, resolution), from first_batch on
    first_batch: int  # epoch-level index of batches[0]
    segment: int


def plan_rank(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    segments: Sequence[tuple[int, int]],
    rank: int,
    window: int,
    schedule: BatchSchedule,
) -> RankPlan:
    """The rest of this epoch for `rank`.

    `segments` lists (world size, batches done) for each stretch of the epoch run at one
    world size; the last one is the current stretch (same world size as now).
    """
    pool = epoch_order(counts, seed, epoch)
    first = 0
    for index, (world, done) in enumerate(segments[:-1]):
        consumed = []
        for r in range(world):
            stream = rank_stream(pool, world, r, seed=seed, epoch=epoch, segment=index, window=window)
            batches = schedule.batches(epoch, first, len(stream))[:done]
            consumed.append(stream[: sum(size for _, size, _ in batches)])
        pool = pool[~np.isin(pool, np.concatenate(consumed))]
        first += done
    world, done = segments[-1]
    segment = len(segments) - 1
    stream = rank_stream(pool, world, rank, seed=seed, epoch=epoch, segment=segment, window=window)
    if len(stream) == 0 and len(pool) > 0 and done == 0 and segment == 0:
        raise DataError(f"{len(pool)} samples cannot be split over {world} ranks: use more data or fewer ranks")
    batches = schedule.batches(epoch, first, len(stream))
    return RankPlan(stream=stream, batches=batches[done:], first_batch=first + done, segment=segment)


def locate(ids: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, index within shard) of global sample ids."""
    offsets = np.cumsum(counts)
    shard = np.searchsorted(offsets, ids, side="right")
    start = offsets[shard] - np.asarray(counts)[shard]
    return shard, ids - start
