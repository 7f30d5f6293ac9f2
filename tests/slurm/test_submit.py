"""Real jobs on the local Slurm cluster, submitted through submitit, read back through sacct."""

import subprocess
import sys
import time

import pytest

from slurmvision.configs import load_cluster, load_config
from slurmvision.errors import ClusterError
from slurmvision.launch.launcher import submit
from slurmvision.slurm.executor import make_executor

# Tests of one group share nodes and run one at a time; the groups run side by side (make test).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("localhost")]


def where_am_i() -> dict:
    import os

    import submitit

    env = submitit.JobEnvironment()
    return {
        "rank": env.global_rank,
        "world": env.num_tasks,
        "job": env.job_id,
        "partition": os.environ["SLURM_JOB_PARTITION"],
    }


def test_job_runs_and_sacct_reports_it(tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job cannot import this test module
    cluster = load_cluster("devslurm")
    executor = make_executor(cluster, tmp_path / "slurm", "sv-test", "slurmvision test")
    job = executor.submit(where_am_i)
    results = job.results()  # one per task; submitit polls sacct for the state
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["partition"] == "low" and r["job"] == job.job_id for r in results)
    # slurmdbd records the job asynchronously: give it (and submitit's cached view) time to catch up.
    for _ in range(60):
        sacct = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job.job_id, "--format=JobName,State,Partition"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if sacct == "sv-test|COMPLETED|low" and job.state == "COMPLETED":
            break
        time.sleep(1)
    assert sacct == "sv-test|COMPLETED|low"
    assert job.state == "COMPLETED"


def test_bad_partition_is_refused_before_submitting(tmp_path):
    config = load_config(
        "digits-demo", ["data.root=/x", "cluster.partition=gpux"], cluster="devslurm", run_dir=tmp_path / "run"
    )
    with pytest.raises(ClusterError, match="partition 'gpux' does not exist.*high, low"):
        submit(config)
    assert not (tmp_path / "run" / "ledger").exists()


def test_a_sigterm_grace_longer_than_the_clusters_kill_wait_is_refused(tmp_path):
    """The local cluster kills a job 10 s after SIGTERM: planning with 30 s would lose the save."""
    config = load_config(
        "digits-demo", ["data.root=/x", "cluster.sigterm_grace_s=30"], cluster="devslurm", run_dir=tmp_path / "run"
    )
    with pytest.raises(ClusterError, match="kills a job 10s after its SIGTERM.*cluster.sigterm_grace_s=10"):
        submit(config)


def test_sbatch_refusal_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurmvision",
            "launch",
            "digits-demo",
            "data.root=/x",
            "--cluster",
            "devslurm",
            "--run-dir",
            str(tmp_path / "run"),
            "cluster.mem_gb=100000",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "Slurm refused the job" in result.stderr and "Traceback" not in result.stderr
