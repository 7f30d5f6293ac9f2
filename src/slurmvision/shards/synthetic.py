"""Synthetic batches (`data.synthetic=true`): the training loop without the shard reader.

As timm's benchmark script does, each rank makes one random batch per resolution once and
yields it step after step: uint8 images of the configured batch size and resolution (they go to
the device and are normalised there like the shard reader's) and labels drawn from the run's
classes. No shard is read and no loader worker runs, so a step costs what the loop itself
costs (forward, backward, optimizer, collectives, logging), measured apart from the data
pipeline. Multi-scale settings keep their per-batch choice of resolution and batch size.

The position is a `LoaderState` (epoch 0, batches taken per world-size segment), saved and
restored as the shard reader's is. Every batch is a function of (seed, rank, resolution), so a
resumed synthetic run goes on with the same batches.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from slurmvision.configs.data import DataConfig
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.plan import BatchSchedule
from slurmvision.shards.reader import Batch, LoaderState, ShardSet

_SYNTHETIC = 4  # a stream tag apart from shards.plan's


def class_names(data: DataConfig) -> list[str]:
    """The classes a run trains on: the manifest's; for synthetic data without shards, '0', '1', ..."""
    if data.synthetic and not data.root:
        return [str(i) for i in range(data.synthetic_classes)]
    return Manifest.load(data.root).classes


class SyntheticReader:
    """Endless fixed random batches for one rank, with the interface of `shards.reader.TrainReader`."""

    def __init__(
        self,
        data: DataConfig,
        num_classes: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        state: Optional[LoaderState] = None,
        pin_memory: bool = False,
    ):
        sizes = data.scale_batch_sizes or [data.batch_size] * len(data.resolutions)
        self.schedule = BatchSchedule(tuple(data.resolutions), tuple(sizes), seed)
        self.state = state or LoaderState(0, [[world_size, 0]])
        if self.state.segments[-1][0] != world_size:
            self.state.segments.append([world_size, 0])
        # Only warm-up given in epochs reads this; without shards the config asks for warm-up steps.
        self.samples_per_epoch = ShardSet.load(data.root, data.train_split).samples if data.root else 0
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, rank, _SYNTHETIC]).generate_state(1)[0])
        )
        self.batches: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
        for resolution, size in zip(self.schedule.resolutions, sizes):
            images = torch.randint(0, 256, (size, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
            targets = torch.randint(0, num_classes, (size,), dtype=torch.int64, generator=generator)
            if pin_memory:
                images, targets = images.pin_memory(), targets.pin_memory()
            self.batches.append((images, targets, [f"synthetic-{resolution}#{i}" for i in range(size)]))

    def __iter__(self) -> Iterator[Batch]:
        """Endless; the state advances as batches are taken."""
        while True:
            index = sum(done for _, done in self.state.segments)
            choice = self.schedule.choice(self.state.epoch, index)
            images, targets, keys = self.batches[choice]
            self.state.segments[-1][1] += 1
            yield Batch(images, targets, keys, [], self.state.epoch, index, self.schedule.resolutions[choice])
