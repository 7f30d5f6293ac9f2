"""The checkpoint format, in one place: what a checkpoint directory holds, its manifest and meta record,
listing a run's checkpoints, choosing the newest valid one, and the weights a run was evaluated with.

Layout of `<run>/checkpoints/step-00000100/`: `state.pt` (model, optimizer, scaler, EMA: everything
replicated, from rank 0), `rank-00000.pt`... (each rank's RNG and data position), `meta.json`, and
`MANIFEST.json` with every file's size and sha256, written last. A save builds `step-N.tmp/` and renames
it into place, then points `latest` at it (`trainer.checkpoint.CheckpointManager`, which writes them from
all ranks together, at once or in the background: the same files either way). A checkpoint counts only
if its manifest verifies. The files are torch.save zips written without the zip's CRC32 where torch
allows it: the manifest's sha256 covers them.

Free of torch at import: `status` and `checkpoint inspect` read checkpoints on the login node. Loading a
checkpoint's tensors imports torch then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slurmvision.errors import CheckpointError

log = logging.getLogger(__name__)

# The meta record's one version field. Checkpoints from before it was written are format 1.
FORMAT_VERSION = 1
VERSION_KEY = "format_version"
MANIFEST = "MANIFEST.json"
META = "meta.json"
STATE = "state.pt"
LATEST = "latest"
RUN_SUBDIR = "checkpoints"  # RUN/checkpoints/step-N
# `step-N`, and `step-N.tmp` while it is written; the ".tmp" group tells them apart.
STEP_DIR = re.compile(r"step-(\d+)(\.tmp)?")
DELETING = ".deleting"  # the suffix of a pruned checkpoint's directory until it is deleted


def checkpoints_of(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / RUN_SUBDIR


def run_of(checkpoint: Path) -> Optional[Path]:
    """The run directory a checkpoint directory is in; None for one copied out of its run."""
    return checkpoint.parent.parent if checkpoint.parent.name == RUN_SUBDIR else None


def step_dir(directory: Path, step: int, tmp: bool = False) -> Path:
    """Where the checkpoint of `step` goes (`tmp`: where it is built)."""
    return directory / (f"step-{step:08d}" + (".tmp" if tmp else ""))


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_text(directory: Path, known: Optional[dict[str, tuple[int, str]]] = None) -> str:
    """The manifest of a checkpoint being built: every file in it with its size and sha256.

    `known` holds the (size, sha256) of files hashed as they were written: those are not read
    again unless their size on disk differs."""
    files = {}
    for path in sorted(directory.iterdir()):
        size = path.stat().st_size
        digest = (known or {}).get(path.name)
        files[path.name] = {"bytes": size, "sha256": digest[1] if digest and digest[0] == size else sha256_file(path)}
    return json.dumps({"files": files}, indent=1)


def meta_text(meta: dict) -> str:
    """The meta record as written: the trainer's facts (step, epoch, world_size, ...) and the format version."""
    return json.dumps({**meta, VERSION_KEY: FORMAT_VERSION}, indent=1, sort_keys=True)


def format_problem(meta: dict) -> Optional[str]:
    """What keeps this slurmvision from reading a checkpoint with this meta record (a newer format), or None."""
    version = meta.get(VERSION_KEY, 1)
    if isinstance(version, int) and version <= FORMAT_VERSION:
        return None
    return (
        f"has format version {version!r}, newer than the {FORMAT_VERSION} this slurmvision reads: "
        "upgrade slurmvision to load it"
    )


def check_format(meta: dict, path: Path) -> None:
    problem = format_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")


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


def leftovers(directory: Path, kept: set[Path]) -> list[Path]:
    """What saves left in `directory` besides the `kept` checkpoints: older checkpoints, the
    `step-N.tmp` of killed saves, the `step-N.old.tmp` a save of the same step moved aside, the
    `step-N.deleting` of a pruning cut short."""
    return [path for path in directory.glob("step-*") if path not in kept]


def verify(path: Path, hashes: bool = True) -> Optional[str]:
    """None if the checkpoint directory is complete and intact, else what is wrong. Without
    `hashes` only the manifest and the files' sizes are checked (cheap, for pruning and `status`)."""
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


@dataclass
class Checkpoint:
    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def load_state(self) -> dict:
        """state.pt: model, optimizer, step, data position, config (tensors and plain containers only)."""
        import torch

        check_format(self.meta, self.path)
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True)

    def load_rank(self, rank: int) -> dict:
        import torch

        return torch.load(self.path / rank_file(rank), map_location="cpu", weights_only=True)


def evaluated_weights(state: dict) -> dict:
    """The model weights a run was evaluated with, from its state.pt: the EMA ones if it kept them."""
    return state.get("ema") or state["engine"]["model"]


def latest(directory: Path, hashes: bool = True, warn: bool = True) -> Optional[Checkpoint]:
    """The newest checkpoint of `directory` that verifies (`hashes`: see `verify`); broken newer ones
    are skipped, with a warning if `warn`."""
    for path in checkpoint_dirs(directory):
        problem = verify(path, hashes)
        if problem is None:
            return Checkpoint(path, read_meta(path))
        if warn:
            log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest valid one in a run or checkpoints directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / META).is_file():
        return path
    for directory in (checkpoints_of(path), path):
        for step in checkpoint_dirs(directory):
            if verify(step) is None:
                return step
    raise CheckpointError(f"no valid checkpoint at {path}: give a run directory or a checkpoints/step-N directory")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or the newest valid one of a run or checkpoints directory, checked
    whole and in a format this slurmvision reads."""
    found = find_checkpoint(path)
    problem = verify(found)
    if problem:
        raise CheckpointError(f"checkpoint {found} is not valid: {problem}")
    checkpoint = Checkpoint(found, read_meta(found))
    check_format(checkpoint.meta, found)
    return checkpoint
