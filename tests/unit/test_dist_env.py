"""Who this process is, read from where it runs: a Slurm task, submitit, torchrun (also inside Slurm)."""

import os

import pytest

from slurmvision.trainer.distributed import DistEnv, from_environment, port_for_job, started_as_a_rank

pytestmark = pytest.mark.unit
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[012-013]",
    "SLURM_RESTART_COUNT": "2",
}


@pytest.fixture
def environ(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SUBMITIT_")) or name in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    return lambda values: [monkeypatch.setenv(k, v) for k, v in values.items()]


def test_nothing_set_is_one_process(environ):
    assert from_environment() == DistEnv()


def test_a_slurm_task(environ):
    environ(SLURM_TASK)
    assert from_environment() == DistEnv(3, 1, 8, "gpu012", port_for_job("4242"), "4242", 2, "slurm")


def test_a_submitit_task_reads_slurm_through_its_job_environment(environ):
    environ({**SLURM_TASK, "SUBMITIT_EXECUTOR": "slurm"})
    assert from_environment() == DistEnv(3, 1, 8, "gpu012", port_for_job("4242"), "4242", 2, "submitit")


def test_torchrun_inside_a_slurm_step_is_told_by_torchrun(environ):
    # `srun torchrun --nproc-per-node 4`: one Slurm task per node, four processes under it.
    environ(
        {
            **SLURM_TASK,
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "RANK": "5",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "MASTER_ADDR": "gpu012",
            "MASTER_PORT": "29400",
        }
    )
    assert from_environment() == DistEnv(5, 1, 8, "gpu012", 29400, "4242", 2, "torchrun")


def test_a_step_of_fewer_tasks_than_its_job_is_its_own_world(environ):
    environ({**SLURM_TASK, "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"})
    assert (from_environment().rank, from_environment().world_size) == (1, 4)


def test_started_as_a_rank_by_torchrun_or_an_srun_step_of_several_tasks_only(environ):
    assert not started_as_a_rank()
    environ({**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "1"})  # a batch script, or `srun -n 1`: it starts its ranks itself
    assert not started_as_a_rank()
    environ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"})
    assert started_as_a_rank()


def test_started_as_a_rank_by_torchrun(environ):
    environ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert started_as_a_rank()


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("gpu[012-015,020],login1", "gpu012"),
        ("node7", "node7"),
        ("a1,b2", "a1"),
        ("rack-[3-4]", "rack-3"),
        ("n[7,9]", "n7"),
        ("a[1-2]-b[3-4]", "a1-b3"),
    ],
)
def test_a_slurm_task_meets_at_the_first_host_of_its_job(environ, nodelist, first):
    environ({**SLURM_TASK, "SLURM_JOB_NODELIST": nodelist})
    assert from_environment().master_addr == first


def test_jobs_sharing_a_node_get_different_ports_in_range():
    ports = {port_for_job(str(job)) for job in range(100, 110)}
    assert len(ports) == 10 and all(20000 <= p < 40000 for p in ports)
