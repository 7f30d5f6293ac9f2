"""benchmarks/gpu.sh --smoke: the GPU benchmark's CPU check runs every stage and writes its tables,
so the script a GPU machine runs has not rotted by then. It measures nothing worth keeping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def leaves(tree, path=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_gpu_benchmark_smoke_mode_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-4000:]
    figures = json.loads((out / "results.json").read_text())["gpu"]
    assert {"throughput", "keys", "grad_checkpointing", "trainer", "deepspeed"} <= figures.keys()
    problems = [(path, value) for path, value in leaves(figures) if path[-1] == "error" or value == "time budget"]
    assert not problems, problems
    assert figures["throughput"]["swinv2_tiny_window8_256@32"]["bf16"]["images_per_s"] > 0
    assert figures["trainer"]["shards, prefetch on"]["data_wait_share"] >= 0
    for table in ("Bare reference loop", "Fast-path keys", "Gradient checkpointing", "shard reader", "DeepSpeed"):
        assert table in done.stdout and table in (out / "RESULTS.md").read_text()
