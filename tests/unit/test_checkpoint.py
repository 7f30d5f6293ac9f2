"""Checkpoints: atomic, verified, retained; a broken newest one is skipped; SIGKILL mid-write is harmless."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from slurmvision.errors import CheckpointError
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.trainer.checkpoint import CheckpointManager, open_checkpoint, rng_state, set_rng_state
from slurmvision.trainer.distributed import DistEnv

pytestmark = pytest.mark.unit


def save(manager, step, value=0.0):
    manager.save(step, {"weights": torch.full((4,), value), "step": step}, {"rng": rng_state()}, {"step": step, "epoch": 0})


def test_save_load_and_retention(tmp_path):
    manager = CheckpointManager(tmp_path, DistEnv(), keep=2)
    for step in (1, 2, 3):
        save(manager, step, float(step))
    assert [p.name for p in manager.candidates()] == ["step-00000003", "step-00000002"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    latest = manager.latest_valid()
    assert latest.step == 3 and torch.equal(latest.load_state()["weights"], torch.full((4,), 3.0))
    assert inspect_checkpoint(tmp_path)["valid"]


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, DistEnv(), keep=3)
    save(manager, 1, 1.0)
    save(manager, 2, 2.0)
    state = tmp_path / "step-00000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-10] ^= 0xFF
    state.write_bytes(bytes(data))
    assert manager.latest_valid().step == 1
    assert "skipping checkpoint" in caplog.text and "sha256" in caplog.text
    report = inspect_checkpoint(tmp_path / "step-00000002")
    assert not report["valid"] and "sha256" in report["problem"]
    with pytest.raises(CheckpointError, match="not valid"):
        open_checkpoint(tmp_path / "step-00000002")


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    manager = CheckpointManager(tmp_path, DistEnv(), keep=1)
    save(manager, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for _ in range(5):
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(manager.latest_valid().load_rank(0)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_usable(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from slurmvision.trainer.checkpoint import CheckpointManager
        from slurmvision.trainer.distributed import DistEnv
        manager = CheckpointManager({str(tmp_path)!r}, DistEnv(), keep=2)
        step = 0
        while True:
            step += 1
            manager.save(step, {{"weights": torch.full((4_000_000,), float(step))}}, {{}}, {{"step": step, "epoch": 0}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    saved = [proc.stdout.readline() for _ in range(2)]  # two complete checkpoints, then kill during later writes
    time.sleep(0.15)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(saved)
    latest = CheckpointManager(tmp_path, DistEnv(), keep=2).latest_valid()
    assert latest is not None and latest.step >= 2
    assert torch.equal(latest.load_state()["weights"][:3], torch.full((3,), float(latest.step)))
    assert json.loads((latest.path / "meta.json").read_text())["step"] == latest.step


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    from slurmvision.trainer import checkpoint as module

    manager = CheckpointManager(tmp_path, DistEnv(), keep=2)
    save(manager, 1, 1.0)
    real_save = module._save

    def full_disk(obj, path):
        if path.name == "state.pt":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(module, "_save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is still the newest"):
        save(manager, 2, 2.0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-00000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert manager.latest_valid().step == 1
