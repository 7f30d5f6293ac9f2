"""The checkpoint I/O benchmark's quick mode runs and writes its section and figures (its speed is not tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_checkpoint_io_benchmark_quick_mode_writes_its_section_and_figures(tmp_path):
    results, figures = tmp_path / "RESULTS.md", tmp_path / "results.json"
    results.write_text("# Benchmark results\n\n## Data pipeline\n\nkept\n")
    figures.write_text(json.dumps({"data_pipeline": {"kept": 1}}))
    command = [sys.executable, "benchmarks/checkpoint_io.py", "--quick", "--dir", str(tmp_path)]
    done = subprocess.run(
        [*command, "--results", str(results), "--json", str(figures)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert "## Data pipeline\n\nkept" in text and "## Checkpoint save, load and async save" in text
    data = json.loads(figures.read_text())
    assert data["data_pipeline"] == {"kept": 1}
    case = data["checkpoint_io"]["swinv2_tiny_window8_256.ddp"]
    for key in ("save_over_raw", "load_s", "async_blocked_s", "step_s", "bytes"):
        assert case[key] > 0, key
    assert data["checkpoint_io"]["machine"]["torch"]
