"""The loop's batches, copied to the GPU one batch ahead (`data.prefetch_to_device`).

On CUDA, when the loop takes a batch, the next batch's host-to-device copy is issued at once, from
the loader's pinned memory with `non_blocking=True` on a side stream, so it runs while the GPU
computes the step on the batch just taken (NVIDIA's apex `data_prefetcher` pattern). The compute
stream waits for the copy only when the batch is used, and `record_stream` keeps the caching
allocator from reusing its memory while the compute stream may still read it.

Reading ahead must not move the data position a checkpoint stores: `position()` is the reader's
state before the first batch the loop has not taken yet, so a batch copied ahead but never used
(a stop, the run's end) is read again after a resume. An error reading ahead (a bad-data
`DataError`) is raised when the loop asks for that batch, where it would have been raised
without prefetching. The loop reads ahead on CUDA only; elsewhere the batches pass through as
they come (reading ahead works on the CPU too, without a copy, which is how its position is tested).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Protocol

import torch

from slurmvision.shards.reader import Batch, LoaderState


class Reader(Protocol):
    """What `shards.reader.TrainReader` and `shards.synthetic.SyntheticReader` offer."""

    state: LoaderState

    def __iter__(self) -> Iterator[Batch]: ...


@dataclasses.dataclass
class _Ahead:
    position: dict  # the reader's state before this batch
    batch: Optional[Batch] = None
    error: Optional[Exception] = None


class DeviceBatches:
    """`ahead=False`: the reader's batches as they come. `ahead=True`: each batch read (and, on CUDA,
    its copy to the device issued) when the loop takes the one before it."""

    def __init__(self, reader: Reader, device: torch.device, ahead: bool):
        self.reader, self.device, self.ahead = reader, device, ahead
        self.stream = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None
        self._batches: Optional[Iterator[Batch]] = None  # started on the first request
        self._ahead: Optional[_Ahead] = None

    def position(self) -> dict:
        """The data position of the next batch the loop will take: what a checkpoint saved now stores."""
        return self._ahead.position if self._ahead is not None else self.reader.state.to_dict()

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = iter(self.reader)
        if not self.ahead:
            return next(self._batches)
        ahead = self._ahead or self._read_ahead()
        self._ahead = None
        if ahead.error is not None:
            raise ahead.error
        batch = ahead.batch
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            batch.images.record_stream(compute)
            batch.targets.record_stream(compute)
        self._ahead = self._read_ahead()  # the next copy goes out before this batch's compute
        return batch

    def _read_ahead(self) -> _Ahead:
        ahead = _Ahead(self.reader.state.to_dict())
        try:
            batch = next(self._batches)
        except Exception as err:  # raised when the loop asks for this batch
            ahead.error = err
            return ahead
        if self.stream is None:
            ahead.batch = batch
            return ahead
        with torch.cuda.stream(self.stream):
            ahead.batch = dataclasses.replace(
                batch,
                images=batch.images.to(self.device, non_blocking=True),
                targets=batch.targets.to(self.device, non_blocking=True),
            )
        return ahead

    def close(self) -> None:
        """Stop the reader (its loader workers) on any way out of the loop."""
        self._ahead = None
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
