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



def test_an_elastic_run_starts_one_set_of_tasks_per_node_it_has(tmp_path):
    """Its job may be resized while it waits (slurmvision.slurm.coordinator): srun must not take the
    task count of the submission from the environment."""
    out = subprocess.run([sys.executable, "-m", "slurmvision", "launch", "digits-demo", "data.root=/x", "--cluster", "a100",
                          "cluster.nodes=4", "cluster.min_nodes=2", "trainer.grad_accum=3", "--run-dir", str(tmp_path / "run"),
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    script = out.split("# resolved config")[0]
    assert "#SBATCH --nodes=4\n" in script
    setup, srun = script.index("export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * 8))"), script.index("\nsrun ")
    assert setup < srun and "--dependency" not in script  # the watcher of an elastic run looks at intervals
