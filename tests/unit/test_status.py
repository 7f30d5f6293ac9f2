"""`status` from the run directory alone: a lost ledger and broken checkpoints cost a line, not a traceback."""

import json

import pytest

from slurmvision.checkpoints import manifest_text
from slurmvision.configs import load_config, save_config
from slurmvision.launch.status import format_status, run_status
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit


def checkpoint(run_dir, step, manifest=None):
    """A checkpoint with the trainer's manifest, or with `manifest` instead."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "epoch": 0, "world_size": 2}))
    (path / "state.pt").write_bytes(b"weights")
    (path / "MANIFEST.json").write_text(manifest or manifest_text(path))
    return path


@pytest.mark.parametrize("broken", ["[]", "{}", "not json", '{"files": {"state.pt": {}}}'])
def test_status_passes_over_a_broken_checkpoint_and_says_the_ledger_is_missing(tmp_path, broken):
    run_dir = tmp_path / "run"
    save_config(load_config("digits-demo", ["data.root=/nowhere"], run_dir=run_dir), run_dir)
    good = checkpoint(run_dir, 10)
    checkpoint(run_dir, 20, broken)
    status = run_status(str(run_dir))
    assert status["last_checkpoint"]["path"] == str(good) and status["step"] == 10
    assert "no ledger records" in format_status(status)


def test_status_folds_the_ledger(tmp_path):
    run_dir = tmp_path / "run"
    save_config(load_config("digits-demo", ["data.root=/nowhere"], run_dir=run_dir), run_dir)
    Ledger(run_dir, writer="attempt").attempt_started("local-1", 0, nodes="vm", world_size=1, step=0, checkpoint=None)
    Ledger(run_dir, writer="attempt").attempt_progress("local-1", 0, step=7, step_time=0.5)
    text = format_status(run_status(str(run_dir)))
    assert "job local-1.0 on vm: steps 0-7, running" in text and "ledger:" not in text
