"""How each file of a checkpoint is written: hashed as it is written, handed to the disk as it goes, fsynced
(`save_file`, `write_text`); the checkpoint's layout and commit are `checkpoint.CheckpointManager`'s."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import torch

WRITEBACK_BYTES = 64 << 20  # _HashedFile
HASH_BLOCK_BYTES = 8 << 20  # what the writer hands the hasher at a time, and the hasher reads at a time
Digests = dict[str, tuple[int, str]]  # file name -> (bytes, sha256), computed as the file was written


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashedFile:
    """A file being written whose sha256 a helper thread computes behind the writer, from the bytes
    already written (read back from the page cache): the manifest does not read the file again, and
    the hash (slower than the write to a fast disk) no longer adds to it. Every WRITEBACK_BYTES
    written are handed to the disk, so the fsync at the end waits for the tail only."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "wb")
        try:
            self._reader = os.open(path, os.O_RDONLY)
        except OSError:
            self.file.close()
            raise
        self.digest = hashlib.sha256()
        self.size = self._visible = self._hashed = self._handed = 0
        self._closing, self._error = False, None
        self._changed = threading.Condition()
        self._hasher = threading.Thread(target=self._follow, name="checkpoint-hash", daemon=True)
        self._hasher.start()

    def write(self, data) -> int:
        written = self.file.write(data)
        self.size += memoryview(data).nbytes
        if self.size - self._visible >= HASH_BLOCK_BYTES:
            self._publish()
        if self._visible - self._handed >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # Starts the writeback of these pages without waiting for it (Linux), and keeps them
            # out of the page cache once written: a checkpoint is read again only by the next job.
            os.posix_fadvise(self.file.fileno(), self._handed, self._visible - self._handed, os.POSIX_FADV_DONTNEED)
            self._handed = self._visible
        return written

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> tuple[int, str]:
        """Waits for the hash, fsyncs: the file's size and sha256."""
        self._publish()
        self._stop_hasher()
        if self._error is not None:
            raise self._error
        os.fsync(self.file.fileno())
        return self.size, self.digest.hexdigest()

    def _publish(self) -> None:
        self.file.flush()  # what the hasher reads must be in the file, not in this buffer
        with self._changed:
            self._visible = self.size
            self._changed.notify()

    def _stop_hasher(self) -> None:
        """The hasher hashes what it was handed, then ends."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._hasher.join()

    def _follow(self) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._hashed < self._visible or self._closing)
                    end, closing = self._visible, self._closing
                while self._hashed < end:
                    block = os.pread(self._reader, min(HASH_BLOCK_BYTES, end - self._hashed), self._hashed)
                    if not block:
                        raise OSError(f"{self.path} is shorter than what was written to it")
                    self.digest.update(block)
                    self._hashed += len(block)
                if closing:
                    return
        except BaseException as err:  # raised by finish(), in the writer's thread
            self._error = err

    def __enter__(self) -> "_HashedFile":
        return self

    def __exit__(self, *exc) -> None:
        self._stop_hasher()  # on an error too (after finish, it has ended already)
        os.close(self._reader)
        self.file.close()


@contextlib.contextmanager
def _without_crc32():
    """torch.save without the zip's CRC32 of each record (torch >= 2.6; torch.load reads such files):
    the manifest's sha256 covers the same bytes, and the CRC32 cost nearly as much as the hash."""
    get, set_ = (getattr(torch.serialization, name, None) for name in ("get_crc32_options", "set_crc32_options"))
    if set_ is None:
        yield
        return
    before = get()
    set_(False)  # a global of torch: one checkpoint is written at a time (CheckpointManager)
    try:
        yield
    finally:
        set_(before)


def save_file(obj: Any, path: Path) -> tuple[int, str]:
    """torch.save to `path`, fsynced: its size and sha256."""
    with _HashedFile(path) as file, _without_crc32():
        torch.save(obj, file)
        return file.finish()


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
