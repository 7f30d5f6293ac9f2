"""The job callable's Slurm calls during the grace time end in time, whatever slurmctld does."""

import subprocess

import pytest

from slurmvision.slurm import job

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
    assert [timeout for _, timeout in scontrol] == [job.SCONTROL_TIMEOUT_S] * 2


def test_a_slurmctld_that_does_not_answer_costs_the_timeout_not_the_job(scontrol):
    assert job.job_state("hang") == "UNKNOWN" and not job.requeue("hang")
