"""`launch --dry-run` for the a100 profile prints exactly the expected sbatch script."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "a100.sbatch"


def dry_run_script() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "slurmvision", "launch", "swinv2-tiny-a100", "data.root=/data/imagenet-shards",
         "--cluster", "a100", "--run-dir", "/scratch/runs/swin", "--dry-run"],
        capture_output=True, text=True, check=True).stdout
    script = out.split("# resolved config")[0].strip() + "\n"
    return script.replace(sys.executable, "PYTHON")


def test_a100_sbatch_script_matches_golden():
    assert dry_run_script() == GOLDEN.read_text()


def test_dry_run_submits_and_writes_nothing(tmp_path):
    subprocess.run([sys.executable, "-m", "slurmvision", "launch", "digits-demo", "data.root=/x", "--cluster", "a100",
                    "--run-dir", str(tmp_path / "run"), "--dry-run"], capture_output=True, check=True)
    assert not (tmp_path / "run").exists()


def test_an_elastic_run_asks_for_a_range_of_nodes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "slurmvision", "launch", "digits-demo", "data.root=/x", "--cluster", "a100",
                          "cluster.nodes=4", "cluster.min_nodes=2", "trainer.grad_accum=3", "--run-dir", str(tmp_path / "run"), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --nodes=2-4\n" in out and out.count("#SBATCH --nodes") == 1
