"""Atomic, verifiable checkpoints written by all ranks together.

Layout of `<run>/checkpoints/step-00000100/`: `state.pt` (model, optimizer, scaler, EMA:
everything replicated, from rank 0), `rank-00000.pt`... (each rank's RNG and data position),
`meta.json`, and `MANIFEST.json` with every file's size and sha256, written last. The
directory is built as `step-N.tmp/` and renamed into place; `latest` is then replaced
atomically. A checkpoint counts only if its manifest verifies. Files hold tensors and
plain containers only, and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from slurmvision.errors import CheckpointError
from slurmvision.trainer.distributed import DistEnv, all_reduce_sum, barrier
from slurmvision.trainer.manifest import FORMAT_VERSION, MANIFEST, META, STATE, find_checkpoint, rank_file, sha256_file, verify

log = logging.getLogger(__name__)


def params_sha256(model_state: dict[str, torch.Tensor]) -> str:
    """A hash of a model's state dict, parameters and persistent buffers (BatchNorm statistics),
    by name in sorted order. Equal hashes mean bitwise equal models.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model_state.items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Every RNG of this process as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def load_state(self) -> dict:
        return torch.load(self.path / STATE, map_location="cpu", weights_only=True)

    def load_rank(self, rank: int) -> Optional[dict]:
        path = self.path / rank_file(rank)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class CheckpointManager:
    def __init__(self, directory: str | Path, env: DistEnv, keep: int, device: torch.device = torch.device("cpu")):
        self.dir = Path(directory)
        self.env, self.keep, self.device = env, keep, device

    def candidates(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)

    def latest_valid(self) -> Optional[Checkpoint]:
        """The newest checkpoint that verifies; broken newer ones are skipped with a warning."""
        for path in self.candidates():
            problem = verify(path)
            if problem is None:
                return Checkpoint(path, json.loads((path / META).read_text()))
            if self.env.is_main:
                log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def save(self, step: int, shared: dict, per_rank: dict, meta: dict) -> Path:
        """Collective: every rank calls it. Rank 0 writes the shared state and commits."""
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f"step-{step:08d}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        error = None
        try:
            _save(per_rank, tmp / rank_file(self.env.rank))
            if self.env.is_main:
                _save(shared, tmp / STATE)
        except OSError as err:  # a full disk or quota, a vanished file system
            error = err
        # Every rank learns of any rank's failure: none may wait in a barrier for a save that
        # will not come, and none may commit a checkpoint that misses a rank's file.
        failed, = all_reduce_sum([float(error is not None)], self.device)
        if failed:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.candidates()
            reason = f"{error.strerror or error} on this rank" if error else f"it failed on {int(failed)} other rank(s)"
            raise CheckpointError(f"could not write checkpoint {final.name}: {reason}. Nothing was replaced: "
                                  f"{kept[0].name if kept else 'no earlier checkpoint'} is still the newest. "
                                  f"Free space in {self.dir} (or lower trainer.keep_checkpoints), then resume")
        barrier()
        if self.env.is_main:
            self._commit(tmp, final, meta)
        barrier()
        return final

    def _commit(self, tmp: Path, final: Path, meta: dict) -> None:
        meta = {**meta, "format_version": FORMAT_VERSION}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest_tmp = tmp / (MANIFEST + ".tmp")
        with open(manifest_tmp, "w") as f:
            json.dump({"files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest_tmp, tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = self.dir / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.dir / "latest")
        _fsync_dir(self.dir)
        self._prune()

    def _prune(self) -> None:
        # Completeness (a manifest) is enough here; hashing every kept checkpoint on each
        # save would cost minutes on large models. Loading still verifies hashes.
        valid = 0
        for path in self.candidates():
            if valid >= self.keep:
                shutil.rmtree(path, ignore_errors=True)
            elif (path / MANIFEST).is_file():
                valid += 1
        for stale in self.dir.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or the newest valid one of a run or checkpoints directory."""
    found = find_checkpoint(path)
    problem = verify(found)
    if problem:
        raise CheckpointError(f"checkpoint {found} is not valid: {problem}")
    return Checkpoint(found, json.loads((found / META).read_text()))
