"""Random access to the samples of one tar shard, tolerant of damage.

A local shard is indexed by reading its tar headers only (tarfile seeks over the data),
then each sample is read with one seek. Remote shards (`pipe:`, `http://`, ...) are fetched
whole through webdataset's `gopen`. A truncated or unreadable shard yields what it can and
says what went wrong, so the reader can count the damage instead of dying.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Optional

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
    def __init__(self, url: str):
        self.url = url
        self._file: Optional[io.IOBase] = None
        self._index: Optional[ShardIndex] = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.url and not self.url.startswith("pipe:")

    def _open(self) -> io.IOBase:
        if self._file is None:
            if self.is_local:
                self._file = open(self.url, "rb")
            else:
                import webdataset

                with webdataset.gopen(self.url, "rb") as stream:
                    self._file = io.BytesIO(stream.read())
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
