"""`slurmvision coordinate`: watch a run's jobs, classify each end, resubmit within budgets.

It keeps no state of its own: everything it knows and decides is in the run's ledger, so
it can be killed and restarted at any time (under nohup or tmux) and goes on where it
was. A lock file keeps a second coordinator of the same run from acting twice.
Slurm requeues preempted jobs and jobs that saved on the time-limit warning by itself;
the coordinator resubmits what Slurm does not bring back (a hard time limit, a crash, a
node failure), each resubmission resuming from the newest valid checkpoint. Slurm's tools
failing or refusing (sacct, squeue, sinfo, sbatch) cost a wait and a retry; only a budget
that runs out stops it.
Torch-free: it runs on the login node.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable, Optional

from slurmvision.configs import load_saved_config
from slurmvision.errors import ClusterError, RunError
from slurmvision.launch.logs import job_folder
from slurmvision.slurm import client, hostlist
from slurmvision.slurm.causes import Cause, Outcome, SlurmAttempt, classify
from slurmvision.slurm.client import in_queue, node_states, sacct_attempts
from slurmvision.slurm.ledger import Ledger
from slurmvision.slurm.rundir import UnsafeRunDir, check_run_dir

log = logging.getLogger("slurmvision.coordinator")
# Ends a new job would meet again: the run stops with this advice. Every other end is retried.
ADVICE = {
    Cause.OOM: "out of memory: lower data.batch_size (raise trainer.grad_accum to keep the global batch), "
    "or set model.grad_checkpointing=true, then relaunch",
    Cause.USER_CANCEL: "the job was cancelled by a user; relaunch the same config to resume it",
}
# sacct lags a fresh submission by seconds; a job that neither it nor squeue knows this long after
# its submission has ended without a trace (an accounting database that lost it).
ACCOUNTING_LAG_S = 300.0
# Node states (sinfo %t, compact form) a node failure leaves behind: the host to keep out.
UNUSABLE = ("down", "drain", "drng", "fail", "maint", "*")
# Resubmissions that fail in a row before the run stops: a refusal that lasts this long (with the
# doubling back-off in between) is a profile Slurm will never take, not a slurmctld restarting.
SUBMIT_FAILURES = 5


class Action(StrEnum):
    WAIT = "wait"
    RESUBMIT = "resubmit"
    FINISHED = "finished"
    STOP = "stop"


@dataclass
class Decision:
    action: Action
    message: str = ""
    exclude: tuple[str, ...] = ()
    delay_s: float = 0.0  # back-off before resubmitting; for a wait, how long until the next try

    @property
    def final(self) -> bool:
        return self.action in (Action.FINISHED, Action.STOP)


def _log_tail(run_dir: Path, job_id: str, size: int = 4000) -> str:
    """The end of each rank's error log of the job (in SWEEP/slurm/ for a sweep's array task)."""
    tails = []
    for path in sorted(job_folder(run_dir, job_id).glob(f"{job_id}_*_log.err")):
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            tails.append(f.read().decode(errors="replace"))
    return "\n".join(tails)


class Coordinator:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        poll_s: float = 30.0,
        attempts_of: Callable[[str], list[SlurmAttempt]] = sacct_attempts,
        queued: Callable[[str], bool] = in_queue,
        submit: Optional[Callable] = None,
        node_states: Callable[[list[str]], dict[str, str]] = node_states,
        pending_nodes: Callable[[str], Optional[int]] = client.pending_nodes,
        partition_states: Callable[[Optional[str]], dict[str, str]] = client.partition_node_states,
        resize: Callable[[str, int, int], None] = client.resize_pending,
    ):
        self.run_dir = Path(run_dir)
        self.config = load_saved_config(self.run_dir)
        if self.config.cluster.executor != "slurm":
            raise RunError(
                f"{self.run_dir} runs on the {self.config.cluster.name!r} profile without Slurm: there is "
                "nothing to coordinate (follow it with `slurmvision status`); launch with a Slurm profile"
            )
        self.ledger = Ledger(self.run_dir, writer="coordinator")
        self.poll_s = poll_s
        self.attempts_of, self.queued = attempts_of, queued
        self._submit = submit
        self.node_states = node_states
        self.pending_nodes, self.partition_states, self.resize = pending_nodes, partition_states, resize

    def run(self) -> Decision:
        """Until the run finishes or cannot go on; returns the final decision."""
        with self._lock():
            self.ledger.event("coordinator", f"coordinator started (pid {os.getpid()})")
            while True:
                decision = self._look()
                if decision.final:
                    return decision
                time.sleep(self.poll_s)

    def once(self) -> Decision:
        """Look once and act once, holding the lock (what each watcher job does)."""
        with self._lock():
            return self._look()

    def _look(self) -> Decision:
        decision = self.tick()
        if decision.final:
            self.ledger.event("coordinator", decision.message)
            log.info("%s", decision.message)
        return decision

    def tick(self) -> Decision:
        """Look once and act once."""
        jobs = self.ledger.jobs()
        if not jobs:
            raise RunError(f"{self.run_dir} has no submitted job: start it with `slurmvision launch`")
        job = jobs[-1]
        try:
            check_run_dir(self.run_dir)
        except UnsafeRunDir as err:  # resubmitting would run what someone else may have written
            self.ledger.put("stopped", str(err))
            return Decision(Action.STOP, str(err))
        try:
            slurm = self.attempts_of(job["job_id"])
            ended = self._ended(job, slurm)
        except ClusterError as err:  # Slurm's tools down or slow: look again next time
            log.warning("cannot read the state of job %s: %s", job["job_id"], err)
            return Decision(Action.WAIT, f"Slurm unreachable: {err}")
        if ended and not slurm:
            log.warning(
                "job %s is neither in the queue nor in sacct %.0fs after its submission: taken as ended",
                job["job_id"],
                time.time() - job["submitted"],
            )
            slurm = [SlurmAttempt("UNKNOWN", "", "")]
        self._record_causes(job["job_id"], slurm)
        if self._finished():
            return Decision(Action.FINISHED, f"run finished: step {self.config.trainer.max_steps} reached")
        if not ended:
            if self.config.cluster.elastic:
                self._fit_waiting_job(job["job_id"])
            return Decision(Action.WAIT)
        if job["handled"]:  # stopped earlier: say so again (a relaunch submits a new job)
            return Decision(Action.STOP, self.ledger.get("stopped", "run stopped"))
        decision = self.decide(job, slurm)
        if decision.action == Action.RESUBMIT:
            # The back-off is kept in the ledger: a restarted coordinator honours it.
            key = f"resubmit_after:{job['job_id']}"
            if self.ledger.get(key) is None:
                self.ledger.put(key, time.time() + decision.delay_s)
            if time.time() < self.ledger.get(key):
                return Decision(
                    Action.WAIT,
                    f"backing off until {time.ctime(self.ledger.get(key))}",
                    delay_s=self.ledger.get(key) - time.time(),
                )
            try:
                new_id = self.resubmit(decision)
            except ClusterError as err:  # not handled yet: the next tick tries again
                return self._submit_failed(job["job_id"], err)
            self.ledger.mark_handled(job["job_id"])
            decision.message += f"; job {new_id} submitted"
            self.ledger.event("coordinator", decision.message)
            log.info("%s", decision.message)
        elif decision.action == Action.STOP:
            self.ledger.put("stopped", decision.message)
            self.ledger.mark_handled(job["job_id"])
        return decision

    def _ended(self, job: dict, slurm: list[SlurmAttempt]) -> bool:
        """Whether the job is over for good. A job Slurm still queues is not, whatever its last
        accounting row says; one without accounting rows is once squeue does not know it either
        and sacct has had ACCOUNTING_LAG_S since its submission to show it."""
        if (slurm and slurm[-1].active) or self.queued(job["job_id"]):
            return False
        return bool(slurm) or time.time() - job["submitted"] > ACCOUNTING_LAG_S

    def _submit_failed(self, job_id: str, err: ClusterError) -> Decision:
        """A resubmission that sinfo or sbatch failed or refused: retried after the doubling back-off
        of `_backoff`, counted in the ledger; SUBMIT_FAILURES in a row stop the run. The ended job
        stays unhandled, so a coordinator started again (once the cause is fixed) resubmits it at once."""
        failures = self.ledger.get(f"submit_failures:{job_id}", 0) + 1
        if failures >= SUBMIT_FAILURES:
            self.ledger.put(f"submit_failures:{job_id}", 0)
            self.ledger.put(f"resubmit_after:{job_id}", time.time())
            return Decision(
                Action.STOP,
                f"run stopped: {failures} resubmissions of job {job_id} failed in a row, the last: "
                f"{err}. Fix the cause, then run `slurmvision coordinate {self.run_dir}` again",
            )
        retry_at = time.time() + self._backoff(failures)
        self.ledger.put(f"submit_failures:{job_id}", failures)
        self.ledger.put(f"resubmit_after:{job_id}", retry_at)
        message = (
            f"resubmission {failures}/{SUBMIT_FAILURES} of job {job_id} failed: {err}; "
            f"trying again after {time.ctime(retry_at)}"
        )
        log.warning("%s", message)
        self.ledger.event("coordinator", message)
        return Decision(Action.WAIT, message, delay_s=retry_at - time.time())

    def _finished(self) -> bool:
        return any(
            a["outcome"] == Outcome.FINISHED and (a["step_reached"] or 0) >= self.config.trainer.max_steps
            for a in self.ledger.attempts()
        )

    def _record_causes(self, job_id: str, slurm: list[SlurmAttempt]) -> None:
        ours = {a["restart"]: a for a in self.ledger.attempts() if a["job_id"] == job_id}
        tail = None
        for restart, row in enumerate(slurm):
            attempt = ours.get(restart)
            # Only the newest row can still be going: older ones (REQUEUED, PREEMPTED) have ended.
            if row.active and restart == len(slurm) - 1 or attempt and attempt["cause"]:
                continue
            if tail is None:
                tail = _log_tail(self.run_dir, job_id)
            cause = classify(attempt, row, tail)
            self.ledger.set_cause(job_id, restart, cause)
            self.ledger.event("coordinator", f"job {job_id} attempt {restart} ended: {cause} ({row.state})")

    def decide(self, job: dict, slurm: list[SlurmAttempt]) -> Decision:
        """What to do about a job that has ended for good."""
        attempts = self.ledger.attempts()
        last = next((a for a in reversed(attempts) if a["job_id"] == job["job_id"]), None)
        cause = (last or {}).get("cause") or classify(last, slurm[-1])
        cluster = self.config.cluster
        if cause in ADVICE:
            return Decision(Action.STOP, f"run stopped: {ADVICE[cause]}")
        if cause == Cause.FINISHED:
            return Decision(Action.FINISHED, "run finished")
        total = len(attempts)
        if total >= cluster.max_attempts:
            return Decision(
                Action.STOP,
                f"run stopped: {total} attempts used (cluster.max_attempts={cluster.max_attempts}); "
                f"the last ended by {cause}. Raise cluster.max_attempts and relaunch the same config to resume",
            )
        if cause == Cause.CRASH:
            return self._after_crash(attempts, last)
        exclude = tuple(job["exclude"].split(",")) if job["exclude"] else ()
        if cause == Cause.NODE_FAILURE:
            failures = sum(a["cause"] == Cause.NODE_FAILURE for a in attempts)
            if failures > cluster.node_failure_retries:
                return Decision(
                    Action.STOP,
                    f"run stopped: {failures} node failures (cluster.node_failure_retries="
                    f"{cluster.node_failure_retries}); check the cluster's health",
                )
            exclude = tuple(sorted(set(exclude) | set(self._failed_nodes(slurm[-1].nodes))))
            return Decision(
                Action.RESUBMIT,
                f"job {job['job_id']} ended by {cause} on {slurm[-1].nodes}; excluding it",
                exclude,
                self._backoff(failures),
            )
        return Decision(Action.RESUBMIT, f"job {job['job_id']} ended by {cause}", exclude)

    def _fit_waiting_job(self, job_id: str) -> None:
        """An elastic run's pending job asks for as many nodes as the partition has working, within
        [min_nodes, nodes]. Slurm requeues a job whose node failed with its old size, and it would
        wait for that node: it shrinks instead, and grows back while it waits once nodes return."""
        cluster = self.config.cluster
        try:
            waiting = self.pending_nodes(job_id)
            if waiting is None:
                return
            states = self.partition_states(cluster.partition)
            working = sum(not any(mark in state for mark in UNUSABLE) for state in states.values())
            target = max(cluster.min_nodes, min(cluster.nodes, working))
            if target == waiting:
                return
            self.resize(job_id, target, target * cluster.tasks_per_node)
        except ClusterError as err:
            log.warning("cannot fit job %s to the working nodes: %s", job_id, err)
            return
        message = (
            f"job {job_id} waited for {waiting} nodes with {working} of the partition working: resized to "
            f"{target} (cluster.min_nodes={cluster.min_nodes}, cluster.nodes={cluster.nodes})"
        )
        self.ledger.event("coordinator", message)
        log.info("%s", message)

    def _failed_nodes(self, nodelist: str) -> list[str]:
        """The job's nodes that Slurm now reports unusable (DOWN, DRAIN, FAIL, not responding): on a
        multi-node job one host fails, not all. All of them when sinfo cannot tell."""
        hosts = hostlist.expand(nodelist) if nodelist and nodelist != "None assigned" else []
        try:
            states = self.node_states(hosts) if hosts else {}
        except ClusterError as err:
            log.warning("cannot ask sinfo which of %s failed (%s): keeping all of them out", nodelist, err)
            return hosts
        bad = [host for host in hosts if any(mark in states.get(host, "down") for mark in UNUSABLE)]
        return bad or hosts

    def _after_crash(self, attempts: list[dict], last: Optional[dict]) -> Decision:
        """Retry a crash; stop when it keeps failing at the same step (a bug, not bad luck)."""
        crashes = [a for a in attempts if a["cause"] == Cause.CRASH]
        step = (last or {}).get("step_reached")
        same_step = 0
        for attempt in reversed(crashes):
            if attempt["step_reached"] != step:
                break
            same_step += 1
        error = (last or {}).get("error") or (
            f"the job's step was torn down (every rank saved on {last['signal']})"
            if (last or {}).get("outcome") == Outcome.STOPPED
            else "no Python error recorded (a killed process?)"
        )
        if same_step > self.config.cluster.crash_retries:
            return Decision(
                Action.STOP,
                f"run stopped: {same_step} attempts crashed at step {step} "
                f"(cluster.crash_retries={self.config.cluster.crash_retries}): {error}. "
                f"Fix the cause, then relaunch to resume from the last checkpoint",
            )
        return Decision(Action.RESUBMIT, f"crash at step {step}: {error}", delay_s=self._backoff(same_step))

    def _backoff(self, repeats: int) -> float:
        """Doubling with each repeat of the same failure, at most an hour."""
        return min(self.config.cluster.retry_backoff_s * 2 ** max(0, repeats - 1), 3600.0)

    def resubmit(self, decision: Decision) -> str:
        if self._submit is not None:
            return self._submit(self.config, reason=decision.message, exclude=decision.exclude)
        from slurmvision.launch.launcher import submit

        # The job it replaces has ended (decided above): `launch`'s check of the queue is not needed.
        return str(submit(self.config, reason=decision.message, exclude=decision.exclude, force=True).job_id)

    @contextmanager
    def _lock(self):
        """One coordinator per run; the lock goes with its process, however that ends."""
        with open(self.run_dir / "coordinator.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"another coordinator is watching {self.run_dir} (pid in {self.run_dir / 'coordinator.lock'})"
                ) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    raise
                # Some NFS mounts have no lock service. The lock only guards against a second
                # coordinator someone starts by hand; the watcher chain runs one at a time.
                log.warning(
                    "file locks are not supported in %s (%s): going on without the lock that keeps a "
                    "second coordinator of this run out; start no other",
                    self.run_dir,
                    err.strerror,
                )
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield
