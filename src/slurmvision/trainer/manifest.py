"""Checkpoint directory layout and its integrity check. Free of torch, for login-node tools."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
META = "meta.json"
STATE = "state.pt"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint directory is complete and intact, else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable manifest ({err})"
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete one in a run or checkpoints directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / META).is_file():
        return path
    for directory in (path / "checkpoints", path):
        steps = sorted((p for p in directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True) \
            if directory.is_dir() else []
        for step in steps:
            if verify(step) is None:
                return step
    from slurmvision.errors import CheckpointError

    raise CheckpointError(f"no valid checkpoint at {path}: give a run directory or a checkpoints/step-N directory")
