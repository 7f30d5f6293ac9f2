"""The job callable's Slurm calls during the grace time end in time, whatever slurmctld does."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from slurmvision.launch import job
from slurmvision.slurm import client

pytestmark = pytest.mark.unit


@pytest.fixture
def scontrol(monkeypatch):
    calls = []

    def run(args, **kwargs):
        calls.append((args, kwargs.get("timeout")))
        if calls[-1][1] is None:
            raise AssertionError(f"{args} without a timeout")
        if "hang" in calls[0][0]:
            raise subprocess.TimeoutExpired(args, kwargs["timeout"])
        return subprocess.CompletedProcess(args, 0, "JobId=7 JobState=RUNNING Reason=None", "")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_the_state_and_the_requeue_ask_scontrol_with_a_timeout(scontrol):
    assert job.job_state("7") == "RUNNING" and job.requeue("7")
    assert [timeout for _, timeout in scontrol] == [client.SLURM_TIMEOUT_S] * 2


def test_a_slurmctld_that_does_not_answer_costs_the_timeout_not_the_job(scontrol):
    assert job.job_state("hang") == "UNKNOWN" and not job.requeue("hang")


# What a training job imports: the callable, the trainer, and what the callable imports when it stops.
JOB_IMPORTS = "slurmvision.launch.job, slurmvision.trainer.entry, slurmvision.slurm.ledger, slurmvision.configs"


def test_every_command_a_training_job_can_run_has_a_timeout():
    listing = (
        f"import sys, {JOB_IMPORTS}\n"
        "print(*(m.__file__ for n, m in sys.modules.items() if n.startswith('slurmvision.') and m.__file__))"
    )
    files = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True).stdout.split()
    assert any(f.endswith("deadline.py") for f in files) and any(f.endswith("job.py") for f in files)
    untimed = [
        f"{file}:{node.lineno}"
        for file in files
        for node in ast.walk(ast.parse(Path(file).read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "subprocess"
        and node.func.attr in ("run", "call", "check_call", "check_output")
        and not any(keyword.arg == "timeout" for keyword in node.keywords)
    ]
    assert not untimed


@pytest.mark.parametrize("state, requeued", [("RUNNING", True), ("COMPLETING", False), ("CANCELLED", False)])
def test_after_a_warning_only_a_running_job_is_requeued(monkeypatch, tmp_path, state, requeued):
    """A warning, then an scancel during the save: the cancelled job must stay cancelled."""
    calls = []
    monkeypatch.setattr(job, "job_state", lambda job_id: state)
    monkeypatch.setattr(job, "requeue", lambda job_id: calls.append(job_id) or True)
    job.TrainJob(str(tmp_path))._come_back("7", "SIGUSR2")
    assert calls == (["7"] if requeued else [])


def test_an_array_task_is_named_as_submitit_and_the_ledger_name_it(monkeypatch):
    """A sweep's run is task 1 of array 7: Slurm gives it its own SLURM_JOB_ID, the ledger knows it as 7_1."""
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert job.slurm_job_id() == "9"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert job.slurm_job_id() == "7_1"
