"""What ranks agree on at a step boundary: which stop every rank reports, and the sums by name."""

import pytest
import torch

from slurmvision.slurm.causes import WARNING_SIGNALS, StopReason
from slurmvision.trainer.distributed import agree
from slurmvision.trainer.step import Boundary, StepTotals

pytestmark = pytest.mark.unit


def boundary(**counts) -> Boundary:
    return Boundary(**{"data_errors": 0, "save_due": 0, "warnings": 0, "terms": 0, "limit_ahead": 0, **counts})


@pytest.mark.parametrize(
    "counts, reason",
    [
        ({}, None),
        ({"save_due": 1}, None),
        ({"terms": 2}, StopReason.SIGTERM),
        ({"warnings": 1, "terms": 1}, StopReason.SIGUSR1),  # a warning on any rank: every rank comes back
        ({"limit_ahead": 1}, StopReason.LIMIT_AHEAD),
        ({"limit_ahead": 1, "terms": 1}, StopReason.SIGTERM),  # a signal's stop is Slurm's: its lead time applies
    ],
)
def test_every_rank_reports_one_stop_reason(counts, reason):
    assert boundary(**counts).stop_reason("USR1") == reason


def test_the_trainers_own_stop_before_the_time_limit_comes_back_like_a_warning():
    assert StopReason.LIMIT_AHEAD in WARNING_SIGNALS and StopReason.SIGTERM not in WARNING_SIGNALS
    assert "time limit ahead" in WARNING_SIGNALS  # as the ledger stores it


def test_agree_fills_a_record_by_field_name_on_a_single_process():
    totals = agree(
        StepTotals, torch.device("cpu"), stop_pending=True, images=12, loss=1.5, nonfinite=False, bad_samples=2
    )
    assert totals == StepTotals(loss=1.5, nonfinite=0.0, images=12.0, bad_samples=2.0, stop_pending=1.0)
