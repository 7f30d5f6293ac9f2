"""`slurmvision checkpoint inspect`: what a checkpoint holds, read from its metadata (no torch)."""

from __future__ import annotations

from pathlib import Path

from slurmvision.trainer.manifest import find_checkpoint, read_meta, verify


def inspect_checkpoint(path: str | Path) -> dict:
    found = find_checkpoint(path)
    problem = verify(found)
    meta = read_meta(found)
    return {
        "path": str(found), "valid": problem is None, "problem": problem,
        **{key: meta.get(key) for key in ("step", "epoch", "samples_seen", "world_size", "engine", "config_hash",
                                          "params_sha256", "version")},
    }
