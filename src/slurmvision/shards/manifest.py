"""The shards' manifest: classes, and per shard its split, sample count, size and sha256.

Login-node safe: no torch, no PIL. Written last and atomically by the writer, so shards
count as built only once it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import unicodedata
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slurmvision.errors import DataError
from slurmvision.shards.tario import DEFAULT_REMOTE_TIMEOUT_S

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so gigabyte shards need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    name: str
    split: str
    count: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    classes: list[str]
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            split = totals.setdefault(shard.split, {"samples": 0, "shards": 0, "bytes": 0})
            split["samples"] += shard.count
            split["shards"] += 1
            split["bytes"] += shard.bytes
        return totals

    def shards_for(self, split: str) -> list[ShardInfo]:
        found = sorted((s for s in self.shards if s.split == split), key=lambda s: s.name)
        if not found:
            raise DataError(
                f"the shards have no {split!r} split (they have: {', '.join(sorted(self.splits)) or 'none'}); "
                f"set data.train_split / data.val_split, or rebuild with a {split}/ folder"
            )
        return found

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "classes": {name: index for index, name in enumerate(self.classes)},
            "splits": self.splits,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        """Raises KeyError/TypeError/ValueError on a malformed layout (`load` turns them into DataError)."""
        classes = sorted(data["classes"], key=lambda name: data["classes"][name])
        if [data["classes"][name] for name in classes] != list(range(len(classes))):
            raise ValueError("class indices are not 0..N-1")
        shards = [
            ShardInfo(str(s["name"]), str(s["split"]), int(s["count"]), int(s["bytes"]), str(s["sha256"]))
            for s in data["shards"]
        ]
        return cls(classes, shards, int(data["format_version"]))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f"{MANIFEST_NAME}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path, remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S) -> "Manifest":
        """From a shards directory (or its manifest file), or a remote root (see `shard_url`)."""
        if is_remote(str(directory_or_file)):
            path = shard_url(str(directory_or_file), MANIFEST_NAME)
            text = _read_remote(path, remote_timeout_s)
        else:
            path = Path(directory_or_file)
            if path.name != MANIFEST_NAME and (path.is_dir() or not path.exists()):
                path = path / MANIFEST_NAME
            if not path.is_file():
                raise DataError(
                    f"no {MANIFEST_NAME} in {path.parent}: build shards with "
                    f"`slurmvision shards build SRC {path.parent}`"
                )
            text = None
        try:
            data = json.loads(text if text is not None else path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError covers JSON and UTF-8 decoding
            raise DataError(f"{path} is not a valid manifest ({err}): rebuild the shards") from None
        # The version decides the layout, so check it before reading anything else.
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path} has format version {version}; this slurmvision reads {FORMAT_VERSION}: "
                f"rebuild the shards with this version"
            )
        try:
            manifest = cls.from_json(data)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{path} is not a valid manifest ({type(err).__name__}: {err}): rebuild the shards"
            ) from None
        # Names become paths and shell words (`shard_url`): one that leaves the directory could
        # read, or with `shards build --overwrite` delete, files elsewhere.
        for i, shard in enumerate(manifest.shards):
            if not _plain_name(shard.name):
                raise DataError(
                    f"{path}: shard {i} is named {shard.name!r}, not a plain file name in the shards "
                    f"directory (no '/', '..', control characters or empty names): rebuild the shards"
                )
        return manifest


def _plain_name(name: str) -> bool:
    """A file name inside a directory: not empty, '.' or '..', no path separator or control character."""
    return name not in ("", ".", "..") and not any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name)


def is_remote(root: str) -> bool:
    return "://" in root or root.startswith("pipe:")


def shard_url(root: str, name: str) -> str:
    """Where file `name` of a shard set lives. `root` is a directory, a URL prefix that
    webdataset can open (`https://host/shards`, `s3://...` with its handlers), or a
    `pipe:` command with `{}` where the file name goes (`pipe:aws s3 cp s3://b/shards/{} -`).
    The name is quoted for the shell (so `{}` must stand outside quotes) or for the URL: one with
    spaces, quotes or `;` stays one file name and cannot add a command."""
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise DataError(
                f"data.root={root!r} is a pipe: command without {{}}: put {{}} where the file name goes, "
                f"e.g. 'pipe:cat /shards/{{}}'"
            )
        return root.replace("{}", shlex.quote(name))
    if is_remote(root):
        name = urllib.parse.quote(name)
        return root.replace("{}", name) if "{}" in root else root.rstrip("/") + "/" + name
    return root.replace("{}", name) if "{}" in root else str(Path(root) / name)


def _read_remote(url: str, timeout_s: float) -> str:
    from slurmvision.shards.tario import RemoteStream

    try:
        with RemoteStream(url, timeout_s) as stream:
            return stream.read().decode("utf-8")
    except Exception as err:  # what the transport raises (I/O, a failed command, a timeout, bad UTF-8)
        raise DataError(f"cannot read {url}: {err}; check data.root and that the shards are reachable") from None
