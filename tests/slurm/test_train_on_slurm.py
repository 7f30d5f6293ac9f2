"""Training jobs on the real local cluster: launch and status, the time-limit warning, real
preemption, a killed rank and a crash that repeats, with the coordinator and its ledger."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurmvision.configs import save_config
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch.launcher import submit, wait_for
from slurmvision.launch.status import run_status
from slurmvision.slurm.ledger import Ledger

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)

# Tests of one group share nodes and run one at a time; the groups run side by side (make test).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("localhost")]
SETTINGS = ["trainer.max_steps=8", "trainer.grad_accum=2", "data.audit=true", "cluster.time_min=10"]
# Long enough (20 epochs of 3 steps, a few seconds) that a signal, a preemption or a kill
# lands mid-run on a fast machine too.
LONGER = ["trainer.max_steps=60", "trainer.checkpoint_every=5", "cluster.retry_backoff_s=0"]
# For the time-limit tests: no attempt finishes within a limit of one minute, however fast the
# machine; the test stops the run once a second attempt trains.
UNENDING = ["trainer.max_steps=1000000", "trainer.checkpoint_every=500", "trainer.log_every=100", "data.audit=false"]


def slurm_config(shards, run_dir, *overrides):
    config = tiny_config(shards, run_dir, *SETTINGS, *overrides)
    from slurmvision.configs import load_cluster

    cluster = load_cluster("devslurm")
    cluster.time_min, cluster.retry_backoff_s, cluster.crash_retries = 10, 0, 1
    config.cluster = cluster
    return config


def wait_for_log(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_until_gone(*job_ids: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while any(squeue_state(job_id) for job_id in job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)


def kill_wait_s() -> int:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return next(int(line.split("=")[1].split()[0]) for line in config.splitlines() if line.startswith("KillWait"))


def start_when_requeued(job_id: str, *updates: str, timeout: float = 120) -> None:
    """A requeued job waits Slurm's requeue delay (~2 min) before it may start; shorten it to
    what the old attempt still needs: KillWait after its SIGTERM, slurmd SIGKILLs whatever runs
    under the job's id, and that would kill a new attempt started sooner (seen after NODE_FAIL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if squeue_state(job_id) == "PENDING":
            time.sleep(kill_wait_s() + 2)
            subprocess.run(["scontrol", "update", f"jobid={job_id}", *updates, "StartTime=now"], capture_output=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued")


def return_to_service(node: str, timeout: float = 60) -> None:
    """Under ReturnToService=2 slurmctld may put the node back by itself once slurmd registers
    again, and then `state=resume` is refused (the node is not down): insist only that it is usable."""
    resume = subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, text=True)
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state and not any(word in state for word in ("down", "drain", "fail")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"node {node} is still {state!r}; scontrol said: {resume.stderr.strip()}")
        time.sleep(0.5)


def second_attempt_trains(run_dir: Path, timeout: float = 300) -> tuple[dict, dict]:
    """The first two attempts, once the second has trained past the step it resumed from."""
    deadline = time.monotonic() + timeout
    attempts: list[dict] = []
    while time.monotonic() < deadline:
        attempts = Ledger(run_dir).attempts() if Ledger(run_dir).exists() else []
        if len(attempts) >= 2 and attempts[1]["step_reached"] > attempts[1]["step_start"]:
            return attempts[0], attempts[1]
        time.sleep(1)
    raise AssertionError(f"no second attempt trained: {attempts}")


def stop_run(watcher: subprocess.Popen, run_dir: Path) -> None:
    """Stop a run that would go on for long: its coordinator first, then every job it had."""
    watcher.kill()
    watcher.wait()
    job_ids = [job["job_id"] for job in Ledger(run_dir).jobs()]
    subprocess.run(["scancel", *job_ids], check=True)
    wait_until_gone(*job_ids)


def coordinator(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slurmvision", "coordinate", str(run_dir), "--poll", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def task_pid(run_dir: Path, rank: int) -> int:
    """The process of one Slurm task of the run's job (submitit starts one per task)."""
    folder = str((run_dir / "slurm").resolve())
    pids = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        # Its loader workers share its command line and environment; the task is their parent.
        if f"SLURM_PROCID={rank}".encode() in environ and parent not in pids:
            return int(pid)
    raise AssertionError(f"no task of rank {rank} among {pids}")


def test_launch_trains_and_status_reports_it(tiny_shards, tmp_path):  # noqa: F811
    config = slurm_config(tiny_shards, tmp_path / "run")
    job = submit(config)
    results = wait_for(job)
    assert results["step"] == 8 and 0.0 <= results["top1"] <= 1.0
    status = run_status(str(tmp_path / "run"))
    assert status["state"] == "finished" and status["step"] == 8
    assert status["jobs"][0]["job_id"] == job.job_id
    (attempt,) = status["attempts"]
    assert attempt["job_id"] == job.job_id and attempt["outcome"] == "finished" and attempt["world_size"] == 2


def test_srun_of_the_train_command_runs_each_task_as_a_rank(tiny_shards, tmp_path):  # noqa: F811
    """Without submitit: a batch script whose `srun` starts `slurmvision train` in each of its two tasks."""
    run_dir = tmp_path / "run"
    save_config(tiny_config(tiny_shards, run_dir, "trainer.max_steps=4"), run_dir)
    train = shlex.join(
        [
            "srun",
            sys.executable,
            "-m",
            "slurmvision",
            "train",
            str(run_dir / "config.yaml"),
            "--run-dir",
            str(run_dir),
            "--json",
        ]
    )
    job = subprocess.run(
        ["sbatch", "--parsable", "-n", "2", "-o", str(tmp_path / "out"), "-e", str(tmp_path / "err"), "--wrap", train],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_until_gone(job, timeout=300)
    assert json.loads((tmp_path / "out").read_text())["step"] == 4, (tmp_path / "err").read_text()[-3000:]  # rank 0's
    assert inspect_checkpoint(run_dir)["world_size"] == 2
    assert (run_dir / "logs" / "rank-00001.log").exists()


@pytest.mark.parametrize("to_one_rank", [False, True], ids=["scancel", "rank-1-only"])
def test_usr2_warning_saves_requeues_and_resumes_bit_for_bit(tiny_shards, tmp_path, straight_sha, to_one_rank):  # noqa: F811
    """`scancel --signal=USR2` reaches every rank; sent to rank 1 alone it is enough too: all
    ranks stop at the same step, save, and rank 0 requeues."""
    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *LONGER))
    watcher = coordinator(run_dir)
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    if to_one_rank:
        os.kill(task_pid(run_dir, 1), signal.SIGUSR2)
    else:
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_for_log(
        run_dir / "logs" / "rank-00000.log",
        "stopped by SIGUSR2 (this rank: none)" if to_one_rank else "stopped by SIGUSR2",
    )
    start_when_requeued(job.job_id)
    code, output = finish(watcher)
    assert code == 0 and "run finished" in output, output
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha
    first, second = Ledger(run_dir).attempts()
    assert (first["job_id"], first["restart"], second["restart"]) == (job.job_id, 0, 1)
    assert first["cause"] == "time limit" and first["signal"] == "SIGUSR2" and first["lost_steps"] == 0
    assert second["step_start"] == first["step_reached"] and second["outcome"] == "finished"
    assert len(Ledger(run_dir).jobs()) == 1  # Slurm requeued it: nothing resubmitted


def test_real_preemption_saves_in_the_grace_time_and_resumes_bit_for_bit(tiny_shards, tmp_path, straight_sha):  # noqa: F811
    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *LONGER))  # the low, preemptible partition
    watcher = coordinator(run_dir)
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-n", "2", "-o", str(tmp_path / "high.out"), "--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for_log(run_dir / "logs" / "rank-00000.log", "stopped by SIGTERM")
    wait_until_gone(high)  # the high job runs, then leaves
    start_when_requeued(job.job_id)
    code, output = finish(watcher)
    assert code == 0 and "run finished" in output, output
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "preemption" and first["lost_steps"] == 0 and second["outcome"] == "finished"
    assert len(Ledger(run_dir).jobs()) == 1  # Slurm requeued it: nothing resubmitted
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    assert "checkpoint saved" in log.split("stopped by SIGTERM")[1].splitlines()[0]


def test_killed_rank_is_resubmitted_from_the_last_checkpoint(tiny_shards, tmp_path, straight_sha):  # noqa: F811
    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *LONGER))
    first_watcher = coordinator(run_dir)
    wait_for_log(run_dir / "logs" / "rank-00000.log", "checkpoint step-00000005")
    # The coordinator dies too; a new one takes over from the ledger.
    first_watcher.kill()
    first_watcher.wait()
    os.kill(task_pid(run_dir, 1), signal.SIGKILL)
    watcher = coordinator(run_dir)
    code, output = finish(watcher)
    assert code == 0 and "run finished" in output, output
    # Resumed from a periodic checkpoint: still the uninterrupted run's weights.
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha
    jobs = Ledger(run_dir).jobs()
    assert len(jobs) == 2 and jobs[0]["job_id"] == job.job_id and "crash" in jobs[1]["reason"]
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "crash" and second["checkpoint"].endswith(f"step-{second['step_start']:08d}")
    assert first["lost_steps"] == first["step_reached"] - second["step_start"] >= 0
    assert run_status(str(run_dir))["lost_steps"] == first["lost_steps"]


def test_a_crash_that_repeats_at_the_same_step_stops_the_run(tiny_shards, tmp_path):  # noqa: F811
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    damaged = sorted(shards.glob("train-*.tar"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:4096])  # most of its samples are gone
    run_dir = tmp_path / "run"
    submit(slurm_config(shards, run_dir, "trainer.max_steps=24", "data.bad_sample_budget=0"))
    code, output = finish(coordinator(run_dir))
    assert code == 1 and "2 attempts crashed at step" in output and "DataError" in output, output
    attempts = Ledger(run_dir).attempts()
    assert [a["cause"] for a in attempts] == ["crash", "crash"]
    assert attempts[0]["step_reached"] == attempts[1]["step_reached"] < 24


def test_hard_time_limit_is_resubmitted_from_the_save_at_the_limit(tiny_shards, tmp_path):  # noqa: F811
    """No warning before the limit: Slurm's SIGTERM at the limit is all the job gets."""
    run_dir = tmp_path / "run"
    config = slurm_config(tiny_shards, run_dir, *UNENDING)
    config.cluster.time_min, config.cluster.signal_delay_s, config.cluster.stop_before_limit = 1, 0, False
    job = submit(config)
    watcher = coordinator(run_dir)
    try:
        first, second = second_attempt_trains(run_dir)
        jobs = Ledger(run_dir).jobs()
    finally:
        stop_run(watcher, run_dir)
    assert jobs[0]["job_id"] == job.job_id and "ended by time limit" in jobs[1]["reason"]
    assert first["cause"] == "time limit" and first["signal"] == "SIGTERM" and first["step_reached"] > 0
    assert first["lost_steps"] == 0 and second["step_start"] == first["step_reached"]


def test_the_job_stops_by_itself_before_a_time_limit_its_warning_would_miss(tiny_shards, tmp_path):  # noqa: F811
    """No warning, but the trainer knows the job's end time (squeue) and its step and save times."""
    run_dir = tmp_path / "run"
    config = slurm_config(tiny_shards, run_dir, *UNENDING)
    config.cluster.time_min, config.cluster.signal_delay_s = 1, 0
    job = submit(config)
    watcher = coordinator(run_dir)
    try:
        wait_for_log(run_dir / "logs" / "rank-00000.log", "stopped by time limit ahead")
        start_when_requeued(job.job_id)
        first, second = second_attempt_trains(run_dir)
        jobs = Ledger(run_dir).jobs()
    finally:
        stop_run(watcher, run_dir)
    assert first["cause"] == "time limit" and first["signal"] == "time limit ahead" and first["step_reached"] > 0
    assert first["lost_steps"] == 0 and second["step_start"] == first["step_reached"]
    assert len(jobs) == 1  # requeued by itself, in time: nothing resubmitted


def test_node_failure_is_recorded_and_the_run_resumes_bit_for_bit(tiny_shards, tmp_path, straight_sha):  # noqa: F811
    """The node goes DOWN under the job (what slurmctld does to a failed node): Slurm ends the
    attempt as NODE_FAIL and requeues the job; the ledger says "node failure"."""
    run_dir = tmp_path / "run"
    job = submit(slurm_config(tiny_shards, run_dir, *LONGER))
    watcher = coordinator(run_dir)
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    node = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=slurmvision-test"], check=True)
        deadline = time.monotonic() + 60
        while squeue_state(job.job_id) not in ("PENDING", "") and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        return_to_service(node)
    start_when_requeued(job.job_id)
    code, output = finish(watcher)
    assert code == 0 and "run finished" in output, output
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "node failure" and second["step_start"] <= first["step_reached"]
    assert second["outcome"] == "finished" and len(Ledger(run_dir).jobs()) == 1  # Slurm requeued it


def test_an_attempt_whose_run_directory_became_writable_stops_before_unpickling(tiny_shards, tmp_path):  # noqa: F811
    from slurmvision.launch.coordinator import Coordinator

    run_dir = tmp_path / "run"
    job_id = str(submit(slurm_config(tiny_shards, run_dir, *UNENDING)).job_id)
    deadline = time.monotonic() + 300
    while not (Ledger(run_dir).exists() and Ledger(run_dir).attempts()) and time.monotonic() < deadline:
        time.sleep(0.5)
    (run_dir / "slurm").chmod(0o770)  # someone of the group could now swap the pickled job
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    start_when_requeued(job_id)
    wait_until_gone(job_id)
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"chmod -R go-w {run_dir.resolve() / 'slurm'}" in log and "Traceback" not in log
    assert len(Ledger(run_dir).attempts()) == 1  # the second attempt never started
    assert any(f"job {job_id} refused: unsafe run directory" in e["message"] for e in Ledger(run_dir).events())
    decision = Coordinator(run_dir).tick()
    assert decision.action == "stop" and "is writable by group or others" in decision.message
