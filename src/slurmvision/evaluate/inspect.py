"""`slurmvision checkpoint inspect`: what a checkpoint holds, read from its metadata (no torch)."""

from __future__ import annotations

from pathlib import Path

from slurmvision.checkpoints import VERSION_KEY, find_checkpoint, format_problem, read_meta, verify


def inspect_checkpoint(path: str | Path) -> dict:
    found = find_checkpoint(path)
    meta = read_meta(found)
    problem = verify(found) or format_problem(meta)
    return {
        "path": str(found),
        "valid": problem is None,
        "problem": problem,
        **{
            key: meta.get(key)
            for key in (
                "step",
                "epoch",
                "samples_seen",
                "world_size",
                "engine",
                "config_hash",
                "params_sha256",
                VERSION_KEY,
            )
        },
    }
