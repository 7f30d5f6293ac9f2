"""Cause classification, the ledger, and the coordinator's decisions on recorded Slurm states.

The coordinator against a real cluster is in tests/slurm; here its rules, one by one.
"""

import errno
import json
import subprocess
import time

import pytest

from slurmvision.configs import load_config, save_config
from slurmvision.errors import ClusterError, RunError
from slurmvision.launch.coordinator import ACCOUNTING_LAG_S, SUBMIT_FAILURES, Coordinator
from slurmvision.slurm.causes import Cause, SlurmAttempt, classify
from slurmvision.slurm.client import in_queue
from slurmvision.slurm.ledger import AttemptRecorder, Ledger

pytestmark = pytest.mark.unit


def row(state, nodes="node1", code="0:0"):
    return SlurmAttempt.parse(f"{state}|{nodes}|{code}")


@pytest.mark.parametrize(
    "attempt, state, tail, cause",
    [
        ({"outcome": "finished"}, "COMPLETED", "", Cause.FINISHED),
        ({"outcome": "stopped", "signal": "SIGUSR2"}, "REQUEUED", "", Cause.TIME_LIMIT),
        ({"outcome": "stopped", "signal": "SIGTERM"}, "PREEMPTED", "", Cause.PREEMPTION),
        ({"outcome": None}, "TIMEOUT", "", Cause.TIME_LIMIT),
        ({"outcome": "stopped", "signal": "SIGTERM"}, "REQUEUED", "", Cause.REQUEUE),
        ({"outcome": "stopped", "signal": "SIGTERM"}, "CANCELLED by 0", "", Cause.USER_CANCEL),
        # slurmstepd's SIGTERM after the batch script's srun was killed: the job FAILED, nobody cancelled it
        ({"outcome": "stopped", "signal": "SIGTERM"}, "FAILED", "", Cause.CRASH),
        ({"outcome": None}, "NODE_FAIL", "", Cause.NODE_FAILURE),
        ({"outcome": "failed", "error": "OutOfMemoryError: CUDA out of memory"}, "FAILED", "", Cause.OOM),
        (None, "OUT_OF_MEMORY", "", Cause.OOM),
        ({"outcome": "failed", "error": "RuntimeError: boom"}, "FAILED", "", Cause.CRASH),
        (None, "FAILED", "Killed", Cause.CRASH),
        (None, "FAILED", "slurmstepd: error: Detected 1 oom-kill event", Cause.OOM),
    ],
)
def test_classify(attempt, state, tail, cause):
    assert classify(attempt, row(state), tail) == cause


def test_sacct_rows_parse_and_know_when_active():
    assert row("CANCELLED by 1234").state == "CANCELLED"
    assert row("PENDING").active and row("REQUEUED").active and not row("FAILED").active
    assert SlurmAttempt.parse("").state == "UNKNOWN"


def test_ledger_counts_lost_steps_between_attempts(tmp_path):
    first = AttemptRecorder(tmp_path, "7", 0, every_s=0)
    first.started(world_size=2, step=0, checkpoint=None)
    first.progress(10, 0.5, saved=10)
    first.progress(14, 0.5)  # a hard kill after step 14: steps 11-14 are lost
    second = AttemptRecorder(tmp_path, "7", 1)
    second.started(world_size=2, step=10, checkpoint="step-10")
    second.ended("finished", 20)
    a, b = Ledger(tmp_path).attempts()
    assert (a["step_reached"], a["step_saved"], a["lost_steps"]) == (14, 10, 4)
    assert (b["step_start"], b["outcome"], b["lost_steps"], b["checkpoint"]) == (10, "finished", 0, "step-10")


def test_ledger_is_shared_between_writers_each_in_its_own_file(tmp_path):
    Ledger(tmp_path, writer="launch").add_job("1", "devslurm")
    Ledger(tmp_path, writer="coordinator").put("k", {"a": 1})
    AttemptRecorder(tmp_path, "1", 0).started(world_size=1, step=0, checkpoint=None)
    files = sorted(path.name.split(".")[0] for path in (tmp_path / "ledger").glob("*.jsonl"))
    assert files == ["attempt-1", "coordinator", "launch"]
    assert Ledger(tmp_path).get("k") == {"a": 1} and Ledger(tmp_path).jobs()[0]["reason"] == "launch"
    assert Ledger(tmp_path).attempts()[0]["world_size"] == 1


def test_a_torn_or_corrupt_record_costs_that_record_and_one_warning(tmp_path, caplog):
    ledger = Ledger(tmp_path, writer="launch")
    ledger.add_job("1", "devslurm")
    ledger.put("k", 1)
    path = next((tmp_path / "ledger").glob("*.jsonl"))
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(lines[0] + b"\n" + b"\x00garbage\n" + lines[2] + b"\n" + b'{"t": 1e12, "op": "put", "ke')
    assert Ledger(tmp_path).get("k") == 1 and Ledger(tmp_path).jobs()[0]["job_id"] == "1"
    assert caplog.text.count("is corrupt") == 1 and "line 2" in caplog.text  # the torn last line is no warning


def test_a_job_id_reused_after_a_database_reset_starts_a_new_job(tmp_path):
    ledger = Ledger(tmp_path, writer="launch")
    ledger.add_job("5", "devslurm")
    old = AttemptRecorder(tmp_path, "5", 0)
    old.started(world_size=1, step=0, checkpoint=None)
    old.ended("failed", 3, error="boom")
    ledger.add_job("5", "devslurm", reason="relaunch")
    AttemptRecorder(tmp_path, "5", 0).started(world_size=1, step=0, checkpoint=None)
    jobs, attempts = Ledger(tmp_path).jobs(), Ledger(tmp_path).attempts()
    assert [j["reason"] for j in jobs] == ["launch", "relaunch"]
    assert len(attempts) == 2 and attempts[-1]["outcome"] is None and attempts[0]["error"] == "boom"


def test_a_ledger_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, caplog):
    recorder = AttemptRecorder(tmp_path / "missing" / "dir", "1", 0)
    recorder.started(world_size=1, step=0, checkpoint=None)
    assert "could not write the ledger" in caplog.text


def test_only_rank_0_records(tmp_path):
    other_rank = AttemptRecorder(tmp_path, "1", 0, enabled=False)
    other_rank.started(world_size=2, step=0, checkpoint=None)
    other_rank.ended("finished", 5)
    assert not list(tmp_path.iterdir())


class FakeCluster:
    """Recorded sacct rows per job, and the jobs the coordinator submits."""

    def __init__(self):
        self.rows: dict[str, list[SlurmAttempt]] = {}
        self.submitted: list[dict] = []
        self.down = False
        self.in_queue: set[str] = set()
        self.states: dict[str, str] = {}  # sinfo's node states; unknown nodes: sinfo cannot tell

    def node_states(self, hosts):
        if not all(host in self.states for host in hosts):
            from slurmvision.errors import ClusterError

            raise ClusterError("`sinfo` failed: invalid node name")
        return {host: self.states[host] for host in hosts}

    def queued(self, job_id):
        return job_id in self.in_queue

    def attempts_of(self, job_id):
        if self.down:
            from slurmvision.errors import ClusterError

            raise ClusterError("`sacct` did not answer in 60s")
        return self.rows.get(job_id, [row("PENDING")])

    def submit(self, config, reason, exclude):
        job_id = str(100 + len(self.submitted))
        self.submitted.append({"job_id": job_id, "reason": reason, "exclude": exclude})
        Ledger(config.run.dir).add_job(job_id, "devslurm", reason, exclude)
        return job_id


@pytest.fixture
def run(tmp_path):
    config = load_config(
        "digits-demo",
        ["data.root=/x", "trainer.max_steps=20", "cluster.retry_backoff_s=0", "cluster.crash_retries=1"],
        cluster="devslurm",
        run_dir=tmp_path / "run",
    )
    save_config(config, tmp_path / "run")
    Ledger(tmp_path / "run").add_job("1", "devslurm")
    cluster = FakeCluster()
    return (
        tmp_path / "run",
        cluster,
        Coordinator(
            tmp_path / "run",
            poll_s=0,
            attempts_of=cluster.attempts_of,
            queued=cluster.queued,
            submit=cluster.submit,
            node_states=cluster.node_states,
        ),
    )


def attempt(run_dir, job_id, restart, start, reached, outcome=None, **kwargs):
    recorder = AttemptRecorder(run_dir, job_id, restart, every_s=0)
    recorder.started(world_size=2, step=start, checkpoint=None)
    recorder.progress(reached)
    if outcome:
        recorder.ended(outcome, reached, **kwargs)


def test_waits_while_the_job_runs_or_slurm_is_down(run):
    run_dir, cluster, coordinator = run
    cluster.rows["1"] = [row("RUNNING")]
    assert coordinator.tick().action == "wait"
    cluster.down = True
    assert coordinator.tick().action == "wait" and not cluster.submitted


def test_requeued_by_slurm_needs_nothing_then_the_run_finishes(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 8, "stopped", signal="SIGUSR2")
    attempt(run_dir, "1", 1, 8, 20, "finished")
    cluster.rows["1"] = [row("REQUEUED"), row("RUNNING")]
    assert coordinator.tick().action == "finished"
    assert not cluster.submitted
    first = Ledger(run_dir).attempts()[0]
    assert first["cause"] == Cause.TIME_LIMIT and first["lost_steps"] == 0


def test_hard_time_limit_is_resubmitted_and_lost_steps_counted(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 13)  # killed at the limit: no end recorded
    cluster.rows["1"] = [row("TIMEOUT")]
    decision = coordinator.tick()
    assert decision.action == "resubmit" and cluster.submitted[0]["reason"].endswith("ended by time limit")
    assert coordinator.tick().action == "wait"  # the new job is pending: nothing twice
    attempt(run_dir, "100", 0, 10, 10)
    assert Ledger(run_dir).attempts()[0]["lost_steps"] == 3


def test_node_failure_excludes_the_node(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 5)
    cluster.rows["1"] = [row("NODE_FAIL", nodes="gpu07")]
    assert coordinator.tick().action == "resubmit"
    assert cluster.submitted[0]["exclude"] == ("gpu07",)


def test_a_multi_node_failure_excludes_only_the_host_slurm_reports_down(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 5)
    cluster.rows["1"] = [row("NODE_FAIL", nodes="gpu[07-08],gpu010")]
    cluster.states = {"gpu07": "idle", "gpu08": "down*", "gpu010": "mix"}
    assert coordinator.tick().action == "resubmit"
    assert cluster.submitted[0]["exclude"] == ("gpu08",)


def test_a_crash_repeating_at_the_same_step_stops_the_run(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 6, "failed", error="RuntimeError: boom")
    cluster.rows["1"] = [row("FAILED")]
    assert coordinator.tick().action == "resubmit"
    attempt(run_dir, "100", 0, 5, 6, "failed", error="RuntimeError: boom")
    cluster.rows["100"] = [row("FAILED")]
    decision = coordinator.tick()
    assert decision.action == "stop" and "2 attempts crashed at step 6" in decision.message
    assert "RuntimeError: boom" in decision.message and len(cluster.submitted) == 1
    again = Coordinator(
        run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=cluster.submit
    )
    assert again.tick().message == decision.message  # a restarted coordinator reports the stop, submits nothing
    assert len(cluster.submitted) == 1


def test_oom_and_user_cancel_stop_with_advice(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 2, "failed", error="OutOfMemoryError: CUDA out of memory")
    cluster.rows["1"] = [row("FAILED")]
    decision = coordinator.tick()
    assert decision.action == "stop" and "grad_checkpointing" in decision.message and not cluster.submitted


@pytest.mark.parametrize("state, action", [("CANCELLED by 0", "stop"), ("FAILED", "resubmit")])
def test_a_sigterm_stop_is_a_cancel_only_when_slurm_says_cancelled(run, state, action):
    # Every rank saved on slurmstepd's SIGTERM. A scancel leaves the job CANCELLED: the run stops. A job
    # step torn down otherwise (its srun killed on the node) leaves it FAILED: nobody asked for a stop.
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 5, "stopped", signal="SIGTERM")
    cluster.rows["1"] = [row(state)]
    decision = coordinator.tick()
    assert decision.action == action
    if action == "stop":
        assert "cancelled by a user" in decision.message and not cluster.submitted
    else:
        assert "crash at step 5: the job's step was torn down (every rank saved on SIGTERM)" in decision.message


def test_budget_of_attempts(run):
    run_dir, cluster, coordinator = run
    coordinator.config.cluster.max_attempts = 2
    attempt(run_dir, "1", 0, 0, 4, "stopped", signal="SIGUSR2")
    attempt(run_dir, "1", 1, 4, 6)
    cluster.rows["1"] = [row("REQUEUED"), row("TIMEOUT")]
    decision = coordinator.tick()
    assert decision.action == "stop" and "cluster.max_attempts=2" in decision.message


def test_backoff_survives_a_restarted_coordinator(run):
    run_dir, cluster, coordinator = run
    coordinator.config.cluster.retry_backoff_s = 3600
    attempt(run_dir, "1", 0, 0, 6, "failed", error="RuntimeError: flaky")
    cluster.rows["1"] = [row("FAILED")]
    assert coordinator.tick().action == "wait"
    again = Coordinator(
        run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=cluster.submit
    )
    again.config.cluster.retry_backoff_s = 3600
    decision = again.tick()
    assert decision.action == "wait" and "backing off" in decision.message and not cluster.submitted
    Ledger(run_dir).put("resubmit_after:1", time.time() - 1)
    assert again.tick().action == "resubmit"


def test_one_coordinator_per_run(run):
    run_dir, cluster, coordinator = run
    with coordinator._lock():
        with pytest.raises(RunError, match="another coordinator"):
            with Coordinator(run_dir)._lock():
                pass


def test_a_file_system_without_locks_costs_a_warning(run, monkeypatch, caplog):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_locks)
    run_dir, cluster, coordinator = run
    cluster.rows["1"] = [row("RUNNING")]
    assert coordinator.once().action == "wait" and "file locks are not supported" in caplog.text


def test_a_run_directory_others_can_write_stops_the_run_before_any_resubmission(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 6, "failed", error="RuntimeError: flaky")
    cluster.rows["1"] = [row("FAILED")]
    (run_dir / "slurm").mkdir(exist_ok=True)
    (run_dir / "slurm").chmod(0o775)
    decision = coordinator.tick()
    assert decision.action == "stop" and "chmod -R go-w" in decision.message and not cluster.submitted


def test_a_preempted_job_that_slurm_requeues_is_left_to_slurm(run):
    run_dir, cluster, coordinator = run
    attempt(run_dir, "1", 0, 0, 5, "stopped", signal="SIGTERM")
    cluster.rows["1"] = [row("PREEMPTED")]  # sacct before the requeued attempt shows up
    cluster.in_queue.add("1")
    assert coordinator.tick().action == "wait" and not cluster.submitted
    assert Ledger(run_dir).attempts()[0]["cause"] == Cause.PREEMPTION
    cluster.in_queue.clear()  # PreemptMode=CANCEL: gone for good, so resubmit
    assert coordinator.tick().action == "resubmit"


def test_a_run_without_slurm_has_nothing_to_coordinate(tmp_path):
    config = load_config("digits-demo", ["data.root=/x"], cluster="local", run_dir=tmp_path / "run")
    save_config(config, tmp_path / "run")
    with pytest.raises(RunError, match="nothing to coordinate"):
        Coordinator(tmp_path / "run")


def squeue_answers(monkeypatch, returncode=0, stdout="", stderr="", timeout=False):
    """subprocess.run as squeue would answer; the commands it was asked, in a list."""
    asked = []

    def run(args, **kwargs):
        asked.append(args)
        if timeout:
            raise subprocess.TimeoutExpired(args, kwargs.get("timeout"))
        return subprocess.CompletedProcess(args, returncode, stdout, stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return asked


@pytest.mark.parametrize(
    "answer, queued",
    [
        ({"stdout": "1234\n"}, True),
        ({"stdout": ""}, False),  # known to Slurm, but ended: squeue lists it no more
        ({"returncode": 1, "stderr": "slurm_load_jobs error: Invalid job id specified\n"}, False),  # forgotten
    ],
)
def test_in_queue_reads_squeue_and_a_forgotten_job_is_not_queued(monkeypatch, answer, queued):
    asked = squeue_answers(monkeypatch, **answer)
    assert in_queue("1234") is queued
    assert asked[0][0] == "squeue" and "1234" in asked[0]


@pytest.mark.parametrize(
    "answer",
    [
        {"returncode": 1, "stderr": "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"},
        {"timeout": True},
    ],
)
def test_in_queue_raises_when_slurm_cannot_answer(monkeypatch, answer):
    squeue_answers(monkeypatch, **answer)
    with pytest.raises(ClusterError):
        in_queue("1234")


def test_a_job_squeue_has_forgotten_is_decided_from_sacct(run, monkeypatch):
    run_dir, cluster, _ = run
    squeue_answers(monkeypatch, returncode=1, stderr="slurm_load_jobs error: Invalid job id specified\n")
    coordinator = Coordinator(
        run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=in_queue, submit=cluster.submit
    )
    attempt(run_dir, "1", 0, 0, 6, "failed", error="RuntimeError: flaky")
    cluster.rows["1"] = [row("FAILED")]
    decision = coordinator.tick()
    assert decision.action == "resubmit" and "crash at step 6" in decision.message and len(cluster.submitted) == 1


def age_job(run_dir, job_id, seconds):
    """Move the job's submission back in time, in the ledger's own records."""
    for path in (run_dir / "ledger").glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for record in records:
            if record["op"] == "job" and record["job_id"] == job_id:
                record["t"] -= seconds
        path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_a_job_neither_sacct_nor_squeue_knows_is_ended_once_sacct_had_time_to_show_it(run):
    run_dir, cluster, coordinator = run
    cluster.rows["1"] = []  # sacct lags a fresh submission
    assert coordinator.tick().action == "wait" and not cluster.submitted
    age_job(run_dir, "1", ACCOUNTING_LAG_S + 1)
    cluster.in_queue.add("1")  # queued all along, sacct slow: still waits
    assert coordinator.tick().action == "wait" and not cluster.submitted
    cluster.in_queue.clear()
    decision = coordinator.tick()
    assert decision.action == "resubmit" and decision.message.startswith("job 1 ended by unknown;")
    assert Ledger(run_dir).attempts()[0]["cause"] == Cause.UNKNOWN
    assert Ledger(run_dir).jobs()[0]["handled"] == 1 and len(cluster.submitted) == 1


class FlakySubmit:
    """sinfo or sbatch failing `failures` times, then submitting to the fake cluster."""

    def __init__(self, cluster, failures, message="`sbatch` did not answer in 30s: is slurmctld up?"):
        self.cluster, self.failures, self.message, self.calls = cluster, failures, message, 0

    def __call__(self, config, reason, exclude):
        self.calls += 1
        if self.calls <= self.failures:
            raise ClusterError(self.message)
        return self.cluster.submit(config, reason, exclude)


def test_failed_resubmissions_are_retried_with_a_growing_backoff_until_one_succeeds(run):
    run_dir, cluster, _ = run
    submit = FlakySubmit(cluster, failures=2)
    coordinator = Coordinator(run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=submit)
    coordinator.config.cluster.retry_backoff_s = 10
    attempt(run_dir, "1", 0, 0, 6)
    cluster.rows["1"] = [row("TIMEOUT")]
    Ledger(run_dir).put("resubmit_after:1", 0)  # the job's own back-off is over
    waits = []
    for failure in (1, 2):
        decision = coordinator.tick()
        assert decision.action == "wait"
        assert f"resubmission {failure}/{SUBMIT_FAILURES} of job 1 failed" in decision.message
        assert "did not answer" in decision.message
        waits.append(Ledger(run_dir).get("resubmit_after:1") - time.time())
        assert coordinator.tick().message.startswith("backing off")  # not before its time
        Ledger(run_dir).put("resubmit_after:1", 0)
    assert waits[0] == pytest.approx(10, abs=2) and waits[1] == pytest.approx(20, abs=2)
    assert Ledger(run_dir).jobs()[0]["handled"] == 0 and not cluster.submitted
    assert sum("resubmission" in e["message"] for e in Ledger(run_dir).events(50)) == 2
    decision = coordinator.tick()
    assert decision.action == "resubmit" and decision.message.endswith("job 100 submitted")
    assert Ledger(run_dir).jobs()[0]["handled"] == 1 and submit.calls == 3


def test_a_refusal_that_repeats_stops_the_run_and_a_restarted_coordinator_tries_again(run):
    run_dir, cluster, _ = run
    submit = FlakySubmit(cluster, failures=100, message="partition 'x' does not exist on this cluster")
    coordinator = Coordinator(run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=submit)
    attempt(run_dir, "1", 0, 0, 6)
    cluster.rows["1"] = [row("TIMEOUT")]
    decision = coordinator.run()  # no ClusterError escapes: the budget ends it
    assert decision.action == "stop" and submit.calls == SUBMIT_FAILURES
    assert f"{SUBMIT_FAILURES} resubmissions of job 1 failed in a row" in decision.message
    assert "partition 'x' does not exist" in decision.message and "slurmvision coordinate" in decision.message
    assert Ledger(run_dir).jobs()[0]["handled"] == 0 and not cluster.submitted
    # The profile fixed: a new coordinator resubmits at once, with a fresh budget.
    again = Coordinator(
        run_dir, poll_s=0, attempts_of=cluster.attempts_of, queued=cluster.queued, submit=cluster.submit
    )
    assert again.tick().action == "resubmit" and len(cluster.submitted) == 1


def test_an_elastic_runs_job_waiting_for_a_failed_node_is_fitted_to_the_working_ones(tmp_path):
    config = load_config(
        "digits-demo",
        ["data.root=/x", "cluster.nodes=3", "cluster.min_nodes=1", "trainer.grad_accum=2"],
        cluster="devslurm",
        run_dir=tmp_path / "run",
    )
    save_config(config, tmp_path / "run")
    Ledger(tmp_path / "run").add_job("1", "devslurm")
    cluster, pending, resized = FakeCluster(), {"1": 3}, []
    cluster.in_queue.add("1")
    cluster.states = {"n1": "idle", "n2": "down*", "n3": "alloc"}  # n3 works, busy with another job
    coordinator = Coordinator(
        tmp_path / "run",
        poll_s=0,
        attempts_of=cluster.attempts_of,
        queued=cluster.queued,
        submit=cluster.submit,
        pending_nodes=pending.get,
        partition_states=lambda partition: cluster.states,
        resize=lambda job_id, nodes, tasks: resized.append((job_id, nodes, tasks)) or pending.update({job_id: nodes}),
    )
    assert coordinator.tick().action == "wait" and resized == [("1", 2, 4)]
    assert "resized to 2" in Ledger(tmp_path / "run").events()[-1]["message"]
    assert coordinator.tick().action == "wait" and resized == [("1", 2, 4)]  # fitted already
    cluster.states["n2"] = "idle"  # the node is back while the job still waits: it grows again
    coordinator.tick()
    assert resized == [("1", 2, 4), ("1", 3, 6)]
    pending.clear()  # running: its size is Slurm's business
    cluster.states["n2"] = "down"
    coordinator.tick()
    assert resized == [("1", 2, 4), ("1", 3, 6)]
