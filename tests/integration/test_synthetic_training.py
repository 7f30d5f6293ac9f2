"""`slurmvision train` with data.synthetic=true: no shards, no loader workers, no evaluation; its
checkpoints save and resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurmvision.configs import load_config, save_config

from .conftest import TINY_MODEL

pytestmark = pytest.mark.integration


def train(run_dir: Path, *overrides: str, json_out: bool = True) -> subprocess.CompletedProcess:
    config = load_config(
        "digits-demo",
        [
            "data.synthetic=true",
            "data.synthetic_classes=5",
            "data.batch_size=6",
            "data.img_size=16",
            "trainer.log_every=2",
            "trainer.checkpoint_every=2",
            "optim.warmup_steps=1",
            *TINY_MODEL,
            *overrides,
        ],
        cluster="local",
        run_dir=run_dir,
    )
    save_config(config, run_dir)
    command = [sys.executable, "-m", "slurmvision", "train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    return subprocess.run([*command, *(["--json"] if json_out else [])], capture_output=True, text=True, timeout=300)


def test_synthetic_training_runs_saves_and_resumes_without_shards(tmp_path):
    run_dir = tmp_path / "run"
    first = train(run_dir, "trainer.max_steps=4", json_out=False)
    assert first.returncode == 0, first.stderr
    assert "finished at step 4 (not evaluated: data.synthetic)" in first.stdout
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    assert "training on random batches held in memory" in log and "data wait 0%" in log
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]

    resumed = train(run_dir, "trainer.max_steps=6", "trainer.allow_config_change=true")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"step": 6, "evaluated": False}
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    assert "step-00000004 (step 4)" in log and "step 6/6" in log
