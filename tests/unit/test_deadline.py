"""The trainer's deadlines: after a stop signal, and before the job's time limit."""

import signal
import time
from datetime import datetime

import pytest

from slurmvision.configs.schema import ClusterConfig
from slurmvision.trainer.deadline import MARGIN_S, SAFETY, StepTimes, TimeLimit, parse_end_time, stop_deadline
from slurmvision.trainer.signals import StopRequest

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
    limit = TimeLimit("123")
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
    limit = TimeLimit(None)
    times = StepTimes()
    times.steps.append(1e6)
    assert limit.end is None and not limit.too_close(times, True)
