"""Reading the samples of one tar shard, tolerant of damage.

A local shard is indexed by reading its tar headers only (tarfile seeks over the data),
then each sample is read with one seek. A remote shard (`pipe:`, `http://`, ...) is streamed
front to back once, keeping only the samples it will be asked for, and a transfer that stalls
times out. A truncated or unreadable shard yields what it can and says what went wrong, so
the reader can count the damage instead of dying.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

# Longest wait for the next bytes of a remote file. Below cluster.signal_delay_s (120 s by
# default): a loader stuck on a hung transfer must not keep the trainer from saving in time.
DEFAULT_REMOTE_TIMEOUT_S = 60.0  # data.remote_timeout_s

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class ShardIndex:
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # ext -> (offset, size)
    error: Optional[str] = None  # why indexing stopped early (truncated, unreadable)


class ShardFile:
    """A local shard, read at random."""

    def __init__(self, path: str):
        self.path = path
        self._file: Optional[io.IOBase] = None
        self._index: Optional[ShardIndex] = None

    def _open(self) -> io.IOBase:
        if self._file is None:
            self._file = open(self.path, "rb")
        return self._file

    def index(self) -> ShardIndex:
        if self._index is not None:
            return self._index
        index = ShardIndex()
        try:
            tar = tarfile.open(fileobj=self._open(), mode="r:")
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not index.keys or index.keys[-1] != key:
                    index.keys.append(key)
                    index.members.append({})
                index.members[-1][ext] = (member.offset_data, member.size)
            # A header whose data runs past the end of the file, or no end-of-archive marker
            # (two zero blocks) after the last member, means a truncated tar.
            end = self._file.seek(0, os.SEEK_END)
            if index.members and max(o + s for o, s in index.members[-1].values()) > end:
                index.keys.pop()
                index.members.pop()
                index.error = "truncated tar"
            else:
                self._file.seek(tar.offset)
                if self._file.read(1024) != bytes(1024):
                    index.error = "truncated tar (no end-of-archive marker)"
        except (tarfile.TarError, EOFError) as err:
            index.error = f"truncated or corrupt tar ({err})"
        except OSError as err:
            index.error = f"unreadable shard ({err.strerror or err})"
        self._index = index
        return index

    def read(self, offset: int, size: int) -> bytes:
        f = self._open()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    def sample(self, i: int) -> tuple[str, dict[str, bytes]]:
        """Key and raw fields of the i-th sample; raises LookupError/OSError if it is missing or unreadable."""
        index = self.index()
        if i >= len(index.keys):
            raise LookupError(index.error or f"sample {i} missing: the shard holds {len(index.keys)}")
        return index.keys[i], {ext: self.read(o, s) for ext, (o, s) in index.members[i].items()}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None


class RemoteStream(io.RawIOBase):
    """A remote file (`pipe:` command or URL webdataset's gopen opens) read as it arrives.
    A read that waits `timeout_s` for data raises TimeoutError; an unclean end of the
    transfer raises OSError."""

    # Unset until opened: close() runs (from __del__) after a failed __init__ too.
    _proc: Optional[subprocess.Popen] = None
    _out: Optional[io.IOBase] = None

    def __init__(self, url: str, timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S):
        self.url, self.timeout_s = url, timeout_s
        if url.startswith("pipe:"):
            # Its own process group, so that closing early ends the whole pipeline, not just its shell.
            self._proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
            self._out = self._proc.stdout
        else:
            import webdataset

            stream = webdataset.gopen(url, "rb")  # a Pipe to curl & co, or a plain file
            self._proc, self._out = getattr(stream, "proc", None), getattr(stream, "stream", stream)
        # poll, not select: select fails on descriptors past 1024, which a busy worker may reach.
        self._poller = select.poll()
        self._poller.register(self._out.fileno(), select.POLLIN)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._poller.poll(self.timeout_s * 1000):
            raise TimeoutError(f"no data from {self.url} for {self.timeout_s:g} s")
        n = os.readv(self._out.fileno(), [buffer])
        if n == 0 and self._proc is not None:
            try:
                status = self._proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{self.url} did not exit {self.timeout_s:g} s after its output ended") from None
            if status != 0:
                raise OSError(f"{self.url} failed (exit status {status})")
        return n

    def close(self) -> None:
        if self.closed:
            return
        if self._proc is not None and self._proc.poll() is None:  # stopped early: the rest is not needed, or hung
            with contextlib.suppress(ProcessLookupError):
                if self.url.startswith("pipe:"):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                else:
                    self._proc.kill()
        if self._out is not None:
            self._out.close()
        if self._proc is not None:
            self._proc.wait()
        super().close()


def _stream_samples(tar: tarfile.TarFile, wanted: set[int]) -> Iterator[tuple[int, str, Optional[dict[str, bytes]]]]:
    """(position, key, fields) of each sample of a tar read as a stream; fields only for the
    positions in `wanted` (else None), so the samples passed over cost no memory."""
    key, position, fields = None, -1, None
    for member in tar:
        if not member.isfile():
            continue
        member_key, ext = split_member_name(member.name)
        if member_key != key:
            if key is not None:
                yield position, key, fields
            key, position = member_key, position + 1
            fields = {} if position in wanted else None
        if fields is not None:
            fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield position, key, fields


class StreamedShard:
    """A remote shard, streamed front to back once. `wanted` holds every position that will be
    asked for (in any order): the ones passed on the way to another are kept until asked for,
    which the reader's shuffle window bounds; the others are dropped as they stream by."""

    def __init__(self, url: str, wanted: Iterable[int], timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S):
        self.url, self.timeout_s = url, timeout_s
        self._wanted = set(wanted)
        self._kept: dict[int, tuple[str, dict[str, bytes]]] = {}
        self._stream: Optional[RemoteStream] = None
        self._samples: Optional[Iterator] = None
        self._passed = 0
        self._error: Optional[str] = None

    def sample(self, i: int) -> tuple[str, dict[str, bytes]]:
        """Key and raw fields of the i-th sample; raises LookupError if it is missing or unreadable."""
        if i not in self._kept:
            self._wanted.add(i)
            self._read_to(i)
        self._wanted.discard(i)
        return self._kept.pop(i)

    def _read_to(self, i: int) -> None:
        if self._error is None:
            try:
                if self._samples is None:
                    self._stream = RemoteStream(self.url, self.timeout_s)
                    self._samples = _stream_samples(tarfile.open(fileobj=self._stream, mode="r|"), self._wanted)
                for position, key, fields in self._samples:
                    self._passed = position + 1
                    if fields is not None:
                        self._kept[position] = (key, fields)
                    if position == i:
                        return
                self._error = f"sample {i} missing: the shard holds {self._passed}"
            except (tarfile.TarError, EOFError) as err:
                self._error = f"truncated or corrupt tar ({err})"
            except OSError as err:  # TimeoutError included
                self._error = f"unreadable shard ({err})"
            self.close()  # spent: later samples fail the same way at once; the ones kept stay readable
        raise LookupError(self._error)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
