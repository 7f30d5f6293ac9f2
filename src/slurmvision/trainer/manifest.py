"""Checkpoint directory layout and its integrity check. Free of torch, for login-node tools."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
META = "meta.json"
STATE = "state.pt"
# `step-N`, and `step-N.tmp` while it is written; the ".tmp" group tells them apart.
STEP_DIR = re.compile(r"step-(\d+)(\.tmp)?")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dirs(directory: Path) -> list[Path]:
    """The checkpoints of a directory, newest step first, one per step: `step-N`, or else a
    `step-N.tmp` whose manifest was written. That one is complete: its save was killed between
    the renames that replace an earlier `step-N` (CheckpointManager._commit)."""
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:  # step-N sorts before step-N.tmp
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and (not match[2] or (path / MANIFEST).is_file()):
            found.setdefault(int(match[1]), path)
    return [found[step] for step in sorted(found, reverse=True)]


def verify(path: Path, hashes: bool = True) -> Optional[str]:
    """None if the checkpoint directory is complete and intact, else what is wrong. Without
    `hashes` only the manifest and the files' sizes are checked (cheap, for pruning)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        entries = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return "no manifest (incomplete write)"
    except OSError as err:
        return f"unreadable manifest ({err})"
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, [], {}, entries without sizes
        return "malformed manifest (not a table of files with their sizes and sha256)"
    missing = [name for name in (STATE, META) if name not in entries]
    if missing:
        return f"the manifest does not list {' and '.join(missing)}"
    for name, (size, sha256) in entries.items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, manifest says {size}"
        if hashes and sha256_file(file) != sha256:
            return f"{name} does not match its sha256"
    return None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta record; empty if it is missing or unreadable (`verify` says why)."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest valid one in a run or checkpoints directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / META).is_file():
        return path
    for directory in (path / "checkpoints", path):
        for step in checkpoint_dirs(directory):
            if verify(step) is None:
                return step
    from slurmvision.errors import CheckpointError

    raise CheckpointError(f"no valid checkpoint at {path}: give a run directory or a checkpoints/step-N directory")
