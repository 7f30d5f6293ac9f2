"""`slurmvision checkpoint inspect`: what a checkpoint holds, read from its metadata (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from slurmvision.trainer.manifest import META, find_checkpoint, verify


def inspect_checkpoint(path: str | Path) -> dict:
    found = find_checkpoint(path)
    problem = verify(found)
    meta = json.loads((found / META).read_text()) if (found / META).is_file() else {}
    return {
        "path": str(found), "valid": problem is None, "problem": problem,
        **{key: meta.get(key) for key in ("step", "epoch", "samples_seen", "world_size", "engine", "config_hash",
                                          "params_sha256", "version")},
    }
