"""The restart and shard build benchmarks' quick modes run and write their sections and figures (their speed is
not tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, tmp_path: Path, *options: str) -> tuple[str, dict]:
    """`script --quick` into RESULTS.md and results.json files in tmp_path that hold another benchmark's figures."""
    results, figures = tmp_path / "RESULTS.md", tmp_path / "results.json"
    results.write_text("# Benchmark results\n\n## Data pipeline\n\nkept\n")
    figures.write_text(json.dumps({"data_pipeline": {"kept": 1}}))
    done = subprocess.run(
        [
            sys.executable,
            f"benchmarks/{script}",
            "--quick",
            *options,
            "--results",
            str(results),
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text, data = results.read_text(), json.loads(figures.read_text())
    assert "## Data pipeline\n\nkept" in text
    assert data["data_pipeline"] == {"kept": 1}
    return text, data


def test_the_restart_benchmark_quick_mode_writes_its_section_and_figures(tmp_path):
    text, data = run_quick("restart.py", tmp_path)
    assert "## Restart breakdown" in text
    run = data["restart"]["setups"]["ddp1"]
    for key in ("interpreter", "imports", "checkpoint_load", "loader_warmup", "first_step", "total"):
        assert run[key] > 0, key
    assert run["total"] == pytest.approx(sum(run[key] for key in run["share"]))
    assert run["import_torch"] > 0 and run["checkpoint_bytes"] > 0
    assert data["restart"]["repeats"] == 1 and len(run["restarts"]) == 1
    assert data["restart"]["torch"]


def test_the_shard_build_benchmark_quick_mode_writes_its_section_and_figures(tmp_path):
    text, data = run_quick("shard_build.py", tmp_path, "--dir", str(tmp_path))
    assert "## Shard build throughput" in text
    figures = data["shard_build"]
    assert figures["workers"] == [1, 2] and figures["cases"]
    for case in figures["cases"].values():
        assert case["images"] > 0 and case["input_bytes"] > 0 and case["shards"] > 1
        for kind in ("build", "verify"):
            for workers in ("1", "2"):
                assert case[kind][workers]["images_per_s"] > 0 and case[kind][workers]["mib_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "results.json"]  # its inputs removed
