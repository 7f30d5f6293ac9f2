"""`launch --dry-run` for the a100 profile prints exactly the expected sbatch script, without a container
and in each container runtime (checked here against the scripts, not on a real pyxis or Apptainer)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden"
MOUNTS = "cluster.container.mounts=[/data,/home/me/.cache/huggingface:/hf:ro]"
CONTAINERS = {
    "a100": [],
    "a100-pyxis": [
        "cluster.container.runtime=pyxis",
        "cluster.container.image=nvcr.io#nvidia/pytorch:24.05-py3",
        MOUNTS,
        "cluster.container.args=[--container-workdir=/tmp]",
    ],
    "a100-apptainer": [
        "cluster.container.runtime=apptainer",
        "cluster.container.image=/images/pytorch.sif",
        MOUNTS,
        "cluster.python=/opt/sv/bin/python",
        "cluster.container.python=/venv/bin/python",
    ],
    "a100-singularity": [
        "cluster.container.runtime=singularity",
        "cluster.container.image=/images/pytorch.sif",
        MOUNTS,
        "cluster.container.args=[--writable-tmpfs]",
    ],
}


def dry_run_script(*overrides: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurmvision",
            "launch",
            "swinv2-tiny-a100",
            "data.root=/data/imagenet-shards",
            "--cluster",
            "a100",
            "--run-dir",
            "/scratch/runs/swin",
            "--dry-run",
            *overrides,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = out.split("# resolved config")[0].strip() + "\n"
    return script.replace(sys.executable, "PYTHON")


@pytest.mark.parametrize("name", CONTAINERS)
def test_a100_sbatch_script_matches_golden(name):
    assert dry_run_script(*CONTAINERS[name]) == (GOLDEN / f"{name}.sbatch").read_text()


def test_dry_run_submits_and_writes_nothing(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "slurmvision",
            "launch",
            "digits-demo",
            "data.root=/x",
            "--cluster",
            "a100",
            "--run-dir",
            str(tmp_path / "run"),
            "--dry-run",
        ],
        capture_output=True,
        check=True,
    )
    assert not (tmp_path / "run").exists()


def test_an_elastic_run_starts_one_set_of_tasks_per_node_it_has(tmp_path):
    """Its job may be resized while it waits (slurmvision.launch.coordinator): srun must not take the
    task count of the submission from the environment."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurmvision",
            "launch",
            "digits-demo",
            "data.root=/x",
            "--cluster",
            "a100",
            "cluster.nodes=4",
            "cluster.min_nodes=2",
            "trainer.grad_accum=3",
            "--run-dir",
            str(tmp_path / "run"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = out.split("# resolved config")[0]
    assert "#SBATCH --nodes=4\n" in script
    setup, srun = script.index("export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * 8))"), script.index("\nsrun ")
    assert setup < srun and "--dependency" not in script  # the watcher of an elastic run looks at intervals
