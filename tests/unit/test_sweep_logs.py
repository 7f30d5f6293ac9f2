"""The logs of a sweep's runs: on Slurm a sweep starts its runs as the tasks of one job array, whose submitit
files are in SWEEP/slurm/ (JOB_TASK_RANK_log.out and .err), not in each RUN/slurm/. `logs`, the coordinator's
look at a job's error log and `status` find them there; a run's later jobs have theirs in RUN/slurm/ again.
The tree is laid out as submitit lays it out (its own JobPaths name the files)."""

import json
import shutil
from datetime import datetime

import pytest
from submitit.core.utils import JobPaths

from slurmvision.cli import main
from slurmvision.configs import load_config, save_config
from slurmvision.launch import logs
from slurmvision.launch.coordinator import Coordinator
from slurmvision.launch.status import run_status
from slurmvision.launch.sweep import SWEEP_FILE, array_task
from slurmvision.slurm.ledger import Ledger
from tests.unit.test_coordinator import FakeCluster, row

pytestmark = pytest.mark.unit
RUNS = ("000-lr=1e-3", "001-lr=5e-4")


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S,000")


def write_job_files(folder, job_id: str, ranks: int = 2) -> None:
    """What submitit and srun write for each rank of a job that started: its start line, a log line."""
    for rank in range(ranks):
        paths = JobPaths(folder, job_id=job_id, task_id=rank)
        paths.folder.mkdir(parents=True, exist_ok=True)
        paths.stdout.write_text(
            f"submitit INFO ({_now()}) - Starting with JobEnvironment(job_id={job_id})\nprint of {job_id}/{rank}\n"
        )
        paths.stderr.write_text(f"{_now()} [rank {rank}] INFO trainer: job {job_id} rank {rank} trains\n")


@pytest.fixture
def sweep(tmp_path):
    """Two runs submitted on Slurm as job array 7 (tasks 7_0 and 7_1), each task started on two ranks."""
    sweep_dir = tmp_path / "sweep"
    for task, name in enumerate(RUNS):
        run_dir = sweep_dir / name
        overrides = ["data.root=/x", "cluster.retry_backoff_s=0"]
        config = load_config("digits-demo", overrides, cluster="devslurm", run_dir=run_dir)
        save_config(config, run_dir)
        ledger = Ledger(run_dir, writer="launch")
        ledger.add_job(f"7_{task}", "devslurm", "sweep")
        write_job_files(sweep_dir / "slurm", f"7_{task}")
        ledger.attempt_started(f"7_{task}", 0, nodes="n1", world_size=2, step=0, checkpoint=None)
    (sweep_dir / "slurm" / "7_submission.sh").write_text("#!/bin/bash\n")  # one for the whole array
    record = {"recipe": "digits-demo", "runs": [{"name": name, "job_id": f"7_{i}"} for i, name in enumerate(RUNS)]}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record))
    return sweep_dir


def logs_of(run_dir, capsys, *options) -> tuple[str, str]:
    assert main(["logs", str(run_dir), *options]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_logs_of_a_sweeps_run_are_its_array_tasks_files(sweep, capsys):
    run = sweep / RUNS[1]
    out, title = logs_of(run, capsys)
    assert out.endswith("job 7_1 rank 0 trains\n") and str(sweep / "slurm" / "7_1_0_log.err") in title
    assert logs_of(run, capsys, "--rank", "1")[0].endswith("job 7_1 rank 1 trains\n")
    assert logs_of(run, capsys, "--stream", "stdout")[0].splitlines()[1:] == ["print of 7_1/0"]
    assert logs_of(sweep / RUNS[0], capsys)[0].endswith("job 7_0 rank 0 trains\n")  # the other task's, its own


def test_a_sweeps_run_resubmitted_later_has_that_jobs_files_in_its_own_directory(sweep, capsys):
    run = sweep / RUNS[1]
    Ledger(run, writer="coordinator").add_job("9", "devslurm", "resubmit")
    write_job_files(run / "slurm", "9")
    Ledger(run, writer="job").attempt_started("9", 0, nodes="n2", world_size=2, step=10, checkpoint=None)
    assert logs_of(run, capsys)[0].endswith("job 9 rank 0 trains\n")
    assert logs_of(run, capsys, "--attempt", "7_1.0")[0].endswith("job 7_1 rank 0 trains\n")
    assert logs.job_folder(run, "9") == run / "slurm" and logs.job_folder(run, "7_1") == sweep / "slurm"


def test_a_missing_rank_of_a_sweeps_run_names_the_file_in_the_sweep(sweep, capsys):
    assert main(["logs", str(sweep / RUNS[1]), "--rank", "5"]) == 2
    assert f"{sweep / 'slurm' / '7_1_5_log.err'} or " in capsys.readouterr().err


def test_a_run_no_sweep_started_as_an_array_task_keeps_its_files_in_its_own_directory(sweep, tmp_path):
    assert logs.job_folder(tmp_path / "run", "7_1") == tmp_path / "run" / "slurm"  # a plain run
    assert array_task(sweep / RUNS[0]) == (sweep.resolve() / "slurm", "7_0")
    shutil.rmtree(sweep / "slurm")  # a sweep without Slurm: each run was submitted into RUN/slurm/
    assert array_task(sweep / RUNS[0]) is None and logs.job_folder(sweep / RUNS[0], "7_0") == sweep / RUNS[0] / "slurm"


def test_the_coordinator_reads_the_error_log_of_the_runs_own_array_task(sweep):
    """An oom-kill leaves no end in the ledger: only the job's error log tells (and only task 1's says so)."""
    with open(sweep / "slurm" / "7_1_1_log.err", "a") as f:
        f.write("slurmstepd: error: Detected 1 oom-kill event in StepId=8.0\n")
    decisions = {}
    for task, name in enumerate(RUNS):
        cluster = FakeCluster()
        cluster.rows[f"7_{task}"] = [row("FAILED")]
        decisions[name] = Coordinator(
            sweep / name, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=cluster.submit
        ).tick()
    assert decisions[RUNS[1]].action == "stop" and "out of memory" in decisions[RUNS[1]].message
    assert decisions[RUNS[0]].action == "resubmit"  # a crash, retried


def test_status_of_a_sweeps_run_that_lost_its_ledger_says_so(sweep):
    shutil.rmtree(sweep / RUNS[0] / "ledger")
    assert "no ledger records" in run_status(str(sweep / RUNS[0]))["ledger"]
