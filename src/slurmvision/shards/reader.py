"""The streaming shard reader: exact resume, equal batches per rank, multi-scale, bad-data budget.

`ShardStream` is an `IterableDataset` that yields whole batches. Loader worker k of K makes
the rank's batches k, k+K, ...; the DataLoader's round-robin over workers then returns
them in plan order, so the sample sequence is the same for any number of workers. Each
sample's augmentation is seeded from (seed, epoch, sample id), not from a worker's RNG.
Images leave the workers as uint8 (normalisation happens on the device).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from slurmvision.configs.data import DataConfig
from slurmvision.errors import DataError
from slurmvision.shards.manifest import Manifest, is_remote, shard_url
from slurmvision.shards.plan import BatchSchedule, RankPlan, locate, plan_rank
from slurmvision.shards.tario import DEFAULT_REMOTE_TIMEOUT_S, IMAGE_EXTS, ShardFile, StreamedShard

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # uint8, N x 3 x H x W
    targets: torch.Tensor  # int64, N
    keys: list[str]
    bad: list[tuple[str, str, str]]  # (shard, key, problem) of samples skipped in this batch
    epoch: int
    index: int  # batch index within the epoch
    resolution: int


def sample_fields(fields: dict[str, bytes], num_classes: int) -> tuple[bytes, int]:
    """(encoded image, label) or raise ValueError naming the problem."""
    image_ext = next((ext for ext in fields if ext in IMAGE_EXTS), None)
    if image_ext is None:
        raise ValueError(f"no image field (has {', '.join(sorted(fields)) or 'nothing'})")
    if "cls" not in fields:
        raise ValueError("no cls field")
    try:
        label = int(fields["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"label {fields['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range 0..{num_classes - 1}")
    return fields[image_ext], label


def transform_sample(transform, encoded: bytes) -> torch.Tensor:
    """The transformed image, or ValueError when it does not decode."""
    from PIL import UnidentifiedImageError

    try:
        return transform(encoded)
    except (OSError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        # What PIL raises for corrupt or truncated data (decoding is lazy, so it can come late).
        raise ValueError(f"image does not decode: {err}") from None


class ShardStream(IterableDataset):
    """The batches of one rank's plan (the rest of an epoch, or an evaluation pass)."""

    def __init__(self, shards: "ShardSet", plan: RankPlan, *, transforms: dict, seed: int, epoch: int):
        self.urls, self.counts, self.names = shards.urls, shards.counts, shards.names
        self.remote_timeout_s = shards.remote_timeout_s
        self.num_classes = shards.num_classes
        self.plan = plan
        self.transforms = transforms  # resolution -> callable(encoded bytes) -> uint8 CHW tensor
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(worker, len(self.plan.batches), workers)
        # Which samples of each shard this worker reads, and after which batch it is done with
        # the shard: closing it then bounds what a worker holds to the shards its window spans.
        wanted: dict[int, set[int]] = {}
        last: dict[int, int] = {}
        for j in mine:
            for s, i in zip(*(a.tolist() for a in self._located(j))):
                wanted.setdefault(s, set()).add(i)
                last[s] = j
        done_after: dict[int, list[int]] = {}
        for s, j in last.items():
            done_after.setdefault(j, []).append(s)
        files: dict[int, ShardFile | StreamedShard] = {}
        try:
            for j in mine:
                yield self._batch(j, files, wanted)
                for s in done_after.get(j, ()):
                    files.pop(s).close()
        finally:
            for f in files.values():
                f.close()

    def _located(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position in it) of each sample of batch j."""
        start, size, _ = self.plan.batches[j]
        return locate(self.plan.stream[start : start + size], self.counts)

    def _batch(self, j: int, files: dict[int, ShardFile | StreamedShard], wanted: dict[int, set[int]]) -> Batch:
        start, size, resolution = self.plan.batches[j]
        ids = self.plan.stream[start : start + size]
        shards, positions = self._located(j)
        images, targets, keys, bad = [], [], [], []
        # Seeded per sample so the augmentation does not depend on which worker ran it;
        # the caller's RNG (the main process when workers=0) is left as it was.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            for sample_id, s, i in zip(ids.tolist(), shards.tolist(), positions.tolist()):
                if s not in files:
                    url = self.urls[s]
                    files[s] = (
                        StreamedShard(url, wanted[s], self.remote_timeout_s) if is_remote(url) else ShardFile(url)
                    )
                shard = files[s]
                key = f"{self.names[s]}#{i}"
                seed = int(np.random.SeedSequence([self.seed, self.epoch, sample_id]).generate_state(1)[0])
                random.seed(seed)
                np.random.seed(seed)
                # The CPU generator only: torch.manual_seed also queues lazy CUDA seeding with a
                # stack trace, which costs more than the image's crop.
                torch.default_generator.manual_seed(seed)
                try:
                    key, fields = shard.sample(i)
                    encoded, label = sample_fields(fields, self.num_classes)
                    image = transform_sample(self.transforms[resolution], encoded)
                except (ValueError, LookupError, OSError) as err:
                    bad.append((self.names[s], key, str(err)))
                    continue
                images.append(image)
                targets.append(label)
                keys.append(key)
        random.setstate(py_state)
        np.random.set_state(np_state)
        stacked = torch.stack(images) if images else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
        return Batch(
            stacked,
            torch.tensor(targets, dtype=torch.int64),
            keys,
            bad,
            self.epoch,
            self.plan.first_batch + j,
            resolution,
        )


@dataclass
class LoaderState:
    """What a checkpoint stores to resume the data exactly."""

    epoch: int = 0
    segments: list[list[int]] = field(default_factory=list)  # [world size, batches done]
    bad_in_epoch: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "segments": [list(s) for s in self.segments], "bad_in_epoch": self.bad_in_epoch}

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderState":
        return cls(int(data["epoch"]), [list(map(int, s)) for s in data["segments"]], int(data.get("bad_in_epoch", 0)))


def _collate_single(batch):
    return batch


@dataclass
class ShardSet:
    """The shards of one split, as listed in the manifest."""

    urls: list[str]
    counts: list[int]
    names: list[str]
    num_classes: int
    remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S

    @classmethod
    def load(cls, root: str, split: str, remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S) -> "ShardSet":
        manifest = Manifest.load(root, remote_timeout_s)
        shards = manifest.shards_for(split)
        return cls(
            [shard_url(str(root), s.name) for s in shards],
            [s.count for s in shards],
            [s.name for s in shards],
            len(manifest.classes),
            remote_timeout_s,
        )

    @property
    def samples(self) -> int:
        return sum(self.counts)


# Slurm signals every process of a job (preemption's SIGTERM, the time-limit warning). The
# training process decides when to stop and saves first; a loader worker killed by the
# signal would crash it before it could. So workers ignore these signals from birth: the
# parent blocks them while it forks the workers, which ignore them, then unblock. Workers
# still exit when the loader closes (the trainer closes it on every way out), and the kernel
# SIGKILLs them when their rank dies: torch's own check of the parent never ran in a worker
# blocked on a full pipe to a rank that was SIGKILLed, which then lived on (seen on a cluster
# without cgroup process tracking, where Slurm does not find such orphans).
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def _worker_init(rank_pid: int, _worker_id: int) -> None:
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: torch's check of the parent remains
        return
    if os.getppid() != rank_pid:  # the rank died before the request took effect
        os._exit(1)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> DataLoader:
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
    # torch RNG, and a resumed run (which creates one at another point) would diverge.
    # Workers are forked, as under srun: a rank started by `train --nproc` (spawned) would
    # otherwise spawn them too, and every epoch would re-import torch and timm in each worker.
    workers = min(workers, len(stream))
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
        collate_fn=_collate_single,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(stream.seed),
        worker_init_fn=functools.partial(_worker_init, os.getpid()),
    )


def start_loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """The loader's iterator, its workers started with the job's signals blocked (see above);
    a signal that arrives meanwhile reaches this process once they are unblocked."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        return iter(make_loader(stream, workers, pin_memory))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def eval_batches(
    data: DataConfig,
    split: str,
    *,
    rank: int,
    world_size: int,
    resolution: Optional[int] = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Every sample of `split` once over all ranks (rank r takes samples r, r+W, ...), in order."""
    from slurmvision.shards.transforms import eval_transform

    shards = ShardSet.load(data.root, split, data.remote_timeout_s)
    resolution = resolution or data.img_size
    stream = np.arange(rank, shards.samples, world_size, dtype=np.int64)
    batches = [
        (start, min(data.batch_size, len(stream) - start), resolution)
        for start in range(0, len(stream), data.batch_size)
    ]
    plan = RankPlan(stream=stream, batches=batches, first_batch=0, segment=0)
    dataset = ShardStream(shards, plan, transforms={resolution: eval_transform(data, resolution)}, seed=0, epoch=0)
    if len(dataset):
        yield from start_loader(dataset, data.workers, pin_memory)


class TrainReader:
    """Epoch after epoch of batches for one rank, with a state that resumes exactly."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        state: Optional[LoaderState] = None,
        pin_memory: bool = False,
    ):
        from slurmvision.shards.transforms import train_transform

        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.shards = ShardSet.load(data.root, data.train_split, data.remote_timeout_s)
        if self.shards.samples < world_size:
            raise DataError(
                f"split {data.train_split!r} has {self.shards.samples} samples, fewer than the {world_size} ranks"
            )
        sizes = data.scale_batch_sizes or [data.batch_size] * len(data.resolutions)
        self.schedule = BatchSchedule(tuple(data.resolutions), tuple(sizes), seed)
        self.transforms = {r: train_transform(data, r) for r in data.resolutions}
        self.pin_memory = pin_memory
        self.state = state or LoaderState(0, [[world_size, 0]])
        if self.state.segments[-1][0] != world_size:
            log.warning(
                "resuming epoch %d on %d ranks (was %d): planning the rest of the epoch over the new ranks",
                self.state.epoch,
                world_size,
                self.state.segments[-1][0],
            )
            self.state.segments.append([world_size, 0])
        self.samples_per_epoch = self.shards.samples
        # Bad-sample budget per rank and epoch: a fraction of the rank's share, or a count.
        budget = data.bad_sample_budget
        self.bad_budget = int(budget * self.samples_per_epoch / world_size) if budget < 1 else int(budget)

    def _stream(self) -> ShardStream:
        plan = plan_rank(
            self.shards.counts,
            seed=self.seed,
            epoch=self.state.epoch,
            rank=self.rank,
            segments=[tuple(s) for s in self.state.segments],
            window=self.data.shuffle_buffer,
            schedule=self.schedule,
        )
        return ShardStream(self.shards, plan, transforms=self.transforms, seed=self.seed, epoch=self.state.epoch)

    def batches_in_epoch(self) -> int:
        """Batches per epoch on a fresh start at this world size (for epoch-based settings)."""
        per_rank = self.samples_per_epoch // self.world_size
        return len(self.schedule.batches(0, 0, per_rank))

    def __iter__(self) -> Iterator[Batch]:
        """Endless: epochs follow each other; the state advances as batches are taken."""
        while True:
            stream = self._stream()
            if len(stream):
                for batch in start_loader(stream, self.data.workers, self.pin_memory):
                    self.state.segments[-1][1] += 1
                    self._count_bad(batch)
                    yield batch
            self.state = LoaderState(self.state.epoch + 1, [[self.world_size, 0]])

    def _count_bad(self, batch: Batch) -> None:
        for shard, key, problem in batch.bad:
            log.warning("skipped bad sample %s in %s: %s", key, shard, problem)
        self.state.bad_in_epoch += len(batch.bad)
        if self.state.bad_in_epoch > self.bad_budget:
            shard, key, problem = batch.bad[-1]
            raise DataError(
                f"{self.state.bad_in_epoch} bad samples in epoch {self.state.epoch} on rank {self.rank}, "
                "over the budget "
                f"of {self.bad_budget} (data.bad_sample_budget={self.data.bad_sample_budget}); last: {key} in {shard}: "
                f"{problem}. Run `slurmvision shards verify {self.data.root}` and rebuild the bad shards"
            )
