"""What sinfo and scontrol print, read into the numbers a profile is checked against."""

import pytest

from slurmvision.slurm.cluster import parse_gpus, parse_kill_wait, parse_time_limit

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text,minutes",
    [
        ("infinite", None),
        ("UNLIMITED", None),
        ("30", 30),
        ("1:00:00", 60),
        ("2-00:00:00", 2880),
        ("1-12", 2160),
        ("1-12:30", 2190),
        ("45:30", 46),
        ("0:00:30", 1),
    ],
)
def test_time_limits_in_every_slurm_form(text, minutes):
    assert parse_time_limit(text) == minutes


def test_gpus_per_node_from_gres():
    assert parse_gpus("gpu:a100:8(S:0-1)") == 8
    assert parse_gpus("gpu:4,shard:16") == 4
    assert parse_gpus("(null)") == 0


def test_kill_wait_from_scontrol_show_config():
    out = (
        "Configuration data as of 2026-11-23T16:00:00\nJobRequeue              = 1\nKillWait                = 10 sec\n"
    )
    assert parse_kill_wait(out) == 10
    assert parse_kill_wait("KillOnBadExit = 0\n") is None
