"""The trainer's deadlines: after a stop signal, and before the job's time limit."""

import signal
import subprocess
import time
from datetime import datetime

import pytest

from slurmvision.configs.cluster import ClusterConfig
from slurmvision.slurm.client import SLURM_TIMEOUT_S
from slurmvision.trainer import signals
from slurmvision.trainer.deadline import MARGIN_S, SAFETY, StepTimes, TimeLimit, parse_end_time, stop_deadline
from slurmvision.trainer.signals import StopRequest, reported_signal

pytestmark = pytest.mark.unit


def test_the_deadline_is_the_warning_lead_or_the_sigterm_grace():
    cluster = ClusterConfig(signal_delay_s=90, sigterm_grace_s=20)
    stop = StopRequest()
    assert stop_deadline(stop, cluster) is None
    stop._handle(signal.SIGUSR2, None)
    assert stop_deadline(stop, cluster) == pytest.approx(stop.received_at + 90)
    term = StopRequest()
    term._handle(signal.SIGTERM, None)
    assert stop_deadline(term, cluster) == pytest.approx(term.received_at + 20)


@pytest.mark.parametrize(
    "arrivals, deadline",
    [
        ([(signal.SIGUSR2, 1000.0), (signal.SIGTERM, 1050.0)], 1070.0),  # a preemption during the warning's lead
        ([(signal.SIGUSR2, 1000.0), (signal.SIGTERM, 1080.0)], 1090.0),
        ([(signal.SIGTERM, 1000.0), (signal.SIGUSR1, 1005.0)], 1020.0),
    ],
)
def test_the_earliest_deadline_of_every_signal_received_wins(monkeypatch, arrivals, deadline):
    stop = StopRequest()
    for signum, at in arrivals:
        monkeypatch.setattr(signals.time, "monotonic", lambda: at)  # noqa: B023  read before the next
        stop._handle(signum, None)
    assert stop.is_warning and stop_deadline(stop, ClusterConfig(signal_delay_s=90, sigterm_grace_s=20)) == deadline


def test_every_rank_reports_the_warning_signal_the_profile_configures():
    assert reported_signal(warnings=1, configured="USR1") == "SIGUSR1"
    assert reported_signal(warnings=2, configured="USR2") == "SIGUSR2"
    assert reported_signal(warnings=0, configured="USR1") == "SIGTERM"


def test_time_to_finish_counts_the_slowest_recent_micro_step_and_the_save():
    times = StepTimes()
    times.micro.extend([1.0, 3.0, 2.0])
    times.save_s = 4.0
    assert times.to_finish(2) == pytest.approx(SAFETY * (2 * 3.0 + 4.0))
    times.steps.extend([5.0, 7.0])
    times.eval_s = 30.0
    assert times.next_step_and_save(False) == pytest.approx(SAFETY * (7.0 + 4.0) + MARGIN_S)
    assert times.next_step_and_save(True) == pytest.approx(SAFETY * (7.0 + 4.0 + 30.0) + MARGIN_S)


def test_end_times_as_slurm_prints_them():
    assert parse_end_time("1795000000\n") == 1795000000.0
    assert parse_end_time("2026-11-23T16:00:05") == datetime(2026, 11, 23, 16, 0, 5).timestamp()
    for unknown in ("N/A", "Unknown", "", "slurm_load_jobs error: Invalid job id specified"):
        assert parse_end_time(unknown) is None


def test_stops_before_the_limit_only_when_a_step_and_a_save_no_longer_fit(monkeypatch):
    now = time.time()
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(now + 100)))
    limit = TimeLimit("123", StopRequest())
    times = StepTimes()
    assert not limit.too_close(times, False), "no step measured yet: nothing to plan with"
    times.steps.append(20.0)
    times.save_s = 10.0
    assert not limit.too_close(times, False)  # 1.5 * 30 + 10 = 55 s needed, 100 s left
    times.eval_s = 40.0
    monkeypatch.setattr(TimeLimit, "_ask_slurm", lambda self: None)  # Slurm unreachable: keep what we knew
    assert limit.too_close(times, True)  # the next step evaluates: 115 s needed
    # An extended time limit (scontrol update) is asked for before stopping.
    monkeypatch.setattr(TimeLimit, "_ask_slurm", lambda self: now + 3600)
    assert not limit.too_close(times, True) and limit.end == now + 3600


def test_without_a_slurm_job_nothing_is_anticipated(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time() + 10)))  # e.g. a local run inside an allocation
    limit = TimeLimit(None, StopRequest())
    times = StepTimes()
    times.steps.append(1e6)
    assert limit.end is None and not limit.too_close(times, True)


def test_slurm_is_asked_with_the_job_timeout_and_never_once_a_stop_came(monkeypatch):
    """The time limit's SIGTERM finds the job near its end: asking squeue then would spend the grace time."""
    asked = []

    def squeue(args, **kwargs):
        asked.append(kwargs.get("timeout"))
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])  # a slurmctld that does not answer

    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    monkeypatch.setattr(subprocess, "run", squeue)
    stop = StopRequest()
    limit = TimeLimit("123", stop)
    assert limit.end is None and asked == [SLURM_TIMEOUT_S]
    limit.end = time.time() + 5
    times = StepTimes()
    times.steps.append(20.0)
    stop._handle(signal.SIGTERM, None)
    assert not limit.too_close(times, False) and asked == [SLURM_TIMEOUT_S]
