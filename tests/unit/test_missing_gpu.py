"""A job whose profile asks for GPUs but that sees none stops at once, says why, and the ledger keeps it."""

import os
import subprocess
import sys

import pytest

from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit


def test_a_task_without_the_gpus_its_profile_asks_for_stops_instead_of_training_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    # No device visible, as on a node of the wrong partition; no data either: it must stop before reading any.
    command = [
        sys.executable,
        "-m",
        "slurmvision",
        "train",
        "digits-demo",
        f"data.root={tmp_path / 'no-shards'}",
        "cluster.gpus_per_node=2",
        "cluster.tasks_per_node=2",
        "--run-dir",
        str(run),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    why = "cluster.gpus_per_node=2 but this task sees no CUDA device"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"slurmvision: error: {why}")
    assert "stopped instead of training on the CPU" in done.stderr
    assert why in (run / "logs" / "rank-00000.log").read_text()
    (attempt,) = Ledger(run).attempts()
    assert attempt["outcome"] == "failed" and why in attempt["error"]
