"""Coordination inside Slurm: watcher jobs chained with `--dependency=afterany`, no process on
the login side; decisions from accounting once squeue has forgotten a job (MinJobAge is 30 s
on the local cluster); one job per run; `slurmvision cancel`."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurmvision.errors import RunError
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch.coordinator import Coordinator
from slurmvision.launch.launcher import launch, submit
from slurmvision.launch.status import format_status, run_status
from slurmvision.slurm.ledger import Ledger

from ..integration.conftest import tiny_shards  # noqa: F401  (fixture)
from .test_train_on_slurm import LONGER, slurm_config, squeue_state, task_pid, wait_for_log, wait_until_gone

# Tests of one group share nodes and run one at a time; the groups run side by side (make test).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("localhost")]


def launch_watched(config) -> str:
    """`slurmvision launch` with the watcher (the default on Slurm profiles); the training job's id."""
    launch(config, coordinate="watcher")
    assert Ledger(config.run.dir).get("watcher")
    return Ledger(config.run.dir).jobs()[0]["job_id"]


def chain_ends(run_dir: Path, timeout: float = 600) -> str:
    """The coordinator's last word once the watcher chain has ended (no watcher left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ledger = Ledger(run_dir)
        final = [
            e["message"]
            for e in ledger.events(100)
            if e["source"] == "coordinator" and e["message"].startswith(("run finished", "run stopped"))
        ]
        if final and ledger.get("watcher") is None:
            return final[-1]
        time.sleep(1)
    raise AssertionError(f"the watcher chain did not end: {format_status(run_status(str(run_dir)))}")


def forgotten(job_id: str, timeout: float = 180) -> None:
    """Until squeue no longer knows the job (MinJobAge after its end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
        if result.returncode != 0 and "Invalid job id" in result.stderr:
            return
        time.sleep(1)
    raise AssertionError(f"squeue still knows job {job_id}")


def test_a_crash_within_budget_is_resubmitted_by_a_watcher_job(tiny_shards, tmp_path, straight_sha):  # noqa: F811
    run_dir = tmp_path / "run"
    job = launch_watched(slurm_config(tiny_shards, run_dir, *LONGER))
    wait_for_log(run_dir / "logs" / "rank-00000.log", "checkpoint step-00000005")
    os.kill(task_pid(run_dir, 1), signal.SIGKILL)
    assert chain_ends(run_dir).startswith("run finished")
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha
    jobs = Ledger(run_dir).jobs()
    assert len(jobs) == 2 and jobs[0]["job_id"] == job and "crash" in jobs[1]["reason"]
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "crash" and second["outcome"] == "finished"
    # Two watchers at least: one woke for the crash and resubmitted, the next saw the run finish.
    logs = sorted((run_dir / "logs").glob("watcher-*.log"))
    assert len(logs) >= 2 and "submitted" in "".join(log.read_text() for log in logs)
    status = format_status(run_status(str(run_dir)))
    assert "watcher:    job" not in status and "unwatched" not in status


def test_a_coordinator_started_after_squeue_forgot_the_job_decides_at_once(tiny_shards, tmp_path):  # noqa: F811
    """The login node rebooted, the coordinator starts late: the crashed job is known to sacct only."""
    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *LONGER))
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    os.kill(task_pid(run_dir, 1), signal.SIGKILL)
    forgotten(job.job_id)
    decision = Coordinator(run_dir).tick()
    new_job = Ledger(run_dir).jobs()[-1]["job_id"]
    subprocess.run(["scancel", new_job], check=True)
    assert decision.action == "resubmit" and "crash" in decision.message and new_job != job.job_id
    assert Ledger(run_dir).attempts()[0]["cause"] == "crash"
    wait_until_gone(new_job)


def test_one_job_per_run_and_cancel_stops_the_job_and_its_watcher(tiny_shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = slurm_config(tiny_shards, run_dir, "trainer.max_steps=1000000", "data.audit=false")
    job = launch_watched(config)
    watcher = Ledger(run_dir).get("watcher")["job_id"]
    with pytest.raises(RunError, match=f"job {job} of {run_dir} is still queued or running: cancel it"):
        launch(config)
    assert len(Ledger(run_dir).jobs()) == 1
    status = format_status(run_status(str(run_dir)))
    assert f"watcher:    job {watcher} pending, waiting for job {job} to end" in status, status
    cancel = subprocess.run(
        [sys.executable, "-m", "slurmvision", "cancel", str(run_dir)], capture_output=True, text=True
    )
    assert cancel.returncode == 0 and job in cancel.stdout and watcher in cancel.stdout, cancel.stderr
    wait_until_gone(job, watcher)
    assert not squeue_state(job) and not squeue_state(watcher)
    assert "cancelled" in format_status(run_status(str(run_dir)))
    assert Coordinator(run_dir).tick().action == "stop"  # a coordinator started later submits nothing
    assert len(Ledger(run_dir).jobs()) == 1
