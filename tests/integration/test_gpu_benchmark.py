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


def gpu_sh(out, *args):
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_gpu_benchmark_smoke_mode_runs_every_stage_and_resumes_what_is_missing(tmp_path):
    out = tmp_path / "out"
    done = gpu_sh(out)
    assert done.returncode == 0, done.stdout[-4000:]
    figures = json.loads((out / "results.json").read_text())["gpu"]
    assert {"throughput", "keys", "compile", "trainer", "data", "deepspeed", "grad_checkpointing"} <= figures.keys()
    problems = [(path, value) for path, value in leaves(figures) if path[-1] == "error" or value == "time budget"]
    assert not problems, problems
    assert figures["throughput"]["swinv2_tiny_window8_256@32"]["bf16"]["images_per_s"] > 0
    assert figures["data"]["shards, prefetch on"]["data_wait_share"] >= 0
    tables = ("Bare reference loop", "Fast-path keys", "model.compile", "against the bare loop", "shard reader")
    for table in (*tables, "DeepSpeed", "Gradient checkpointing"):
        assert table in done.stdout and table in (out / "RESULTS.md").read_text()

    # A run cut short: --resume measures what was skipped or failed, and keeps what was measured.
    results = json.loads((out / "results.json").read_text())
    results["gpu"]["keys"]["defaults"]["images_per_s"] = 12345.0
    results["gpu"]["deepspeed"]["zero1"] = {"skipped": "time budget"}
    results["gpu"]["grad_checkpointing"]["on"] = {"error": "OutOfMemoryError: CUDA out of memory"}
    (out / "results.json").write_text(json.dumps(results))
    done = gpu_sh(out, "--resume")
    assert done.returncode == 0, done.stdout[-4000:]
    resumed = json.loads((out / "results.json").read_text())["gpu"]
    assert resumed["keys"]["defaults"]["images_per_s"] == 12345.0
    assert resumed["deepspeed"]["zero1"]["images_per_s"] > 0 and resumed["grad_checkpointing"]["on"]["images_per_s"] > 0
    assert resumed["throughput"] == figures["throughput"]
