"""Training jobs on the real local cluster: launch, status, and a USR2 warning that requeues and resumes."""

import subprocess
import time
from pathlib import Path

import pytest

from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch.launcher import submit, wait_for
from slurmvision.launch.local import train_here
from slurmvision.launch.status import run_status

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm
SETTINGS = ["trainer.max_steps=8", "trainer.grad_accum=2", "data.audit=true", "cluster.time_min=10"]


def slurm_config(shards, run_dir, *overrides):
    config = tiny_config(shards, run_dir, *SETTINGS, *overrides)
    from slurmvision.configs import load_cluster

    config.cluster = load_cluster("devslurm")
    config.cluster.time_min = 10
    return config


def sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "--format=State"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_log(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_launch_trains_and_status_reports_it(tiny_shards, tmp_path):  # noqa: F811
    config = slurm_config(tiny_shards, tmp_path / "run")
    job = submit(config)
    results = wait_for(job)
    assert results["step"] == 8 and 0.0 <= results["top1"] <= 1.0
    status = run_status(str(tmp_path / "run"))
    assert status["state"] == "finished" and status["step"] == 8
    assert status["jobs"][0]["job_id"] == job.job_id


def test_usr2_warning_saves_requeues_and_resumes_bit_for_bit(tiny_shards, tmp_path):  # noqa: F811
    # Long enough (8 epochs of 3 steps) that the signal lands mid-run, wherever exactly.
    longer = ["trainer.max_steps=24", "trainer.checkpoint_every=50"]
    straight = train_here(tiny_config(tiny_shards, tmp_path / "straight", *SETTINGS, *longer), nproc=2)

    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *longer))
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_for_log(run_dir / "logs" / "rank-00000.log", "stopped by SIGUSR2")
    # The requeued job waits Slurm's requeue delay before it may start; skip the wait.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "PENDING":
            # Not in the second of the requeue: Slurm would refuse the old job credential.
            time.sleep(3)
            subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now"], capture_output=True)
            break
        time.sleep(0.5)
    results = wait_for(job)
    assert results["step"] == 24
    assert inspect_checkpoint(run_dir)["params_sha256"] == inspect_checkpoint(tmp_path / "straight")["params_sha256"]
    assert results["top1"] == straight["top1"]
    # The accounting record lags the job's end by a moment.
    deadline = time.monotonic() + 60
    while (states := sacct_states(job.job_id))[-1] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, states
