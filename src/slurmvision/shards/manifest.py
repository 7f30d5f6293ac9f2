"""The shards' manifest: classes, and per shard its split, sample count, size and sha256.

Login-node safe: no torch, no PIL.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slurmvision.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
            raise DataError(f"the shards have no {split!r} split (they have: {', '.join(sorted(self.splits)) or 'none'}); "
                            f"set data.train_split / data.val_split, or rebuild with a {split}/ folder")
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
        classes = sorted(data["classes"], key=lambda name: data["classes"][name])
        return cls(classes, [ShardInfo(**s) for s in data["shards"]], int(data["format_version"]))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "Manifest":
        path = Path(directory_or_file)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"no {MANIFEST_NAME} in {path.parent}: build shards with `slurmvision shards build SRC {path.parent}`")
        try:
            data = json.loads(path.read_text())
            manifest = cls.from_json(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path} is not a valid manifest ({err}): rebuild the shards") from None
        if manifest.format_version != FORMAT_VERSION:
            raise DataError(f"{path} has format version {manifest.format_version}; this slurmvision reads "
                            f"{FORMAT_VERSION}: rebuild the shards with this version")
        return manifest
