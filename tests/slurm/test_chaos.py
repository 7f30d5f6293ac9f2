"""The short chaos run (benchmarks/chaos.py): three faults drawn from a seed, on the real local cluster."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# node-down takes localhost: the tests of that group run one at a time (make test).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("localhost")]
ROOT = Path(__file__).resolve().parents[2]


def test_a_seeded_chaos_run_ends_with_the_uninterrupted_weights_and_no_sample_lost_or_repeated(tmp_path):
    # Seed 96 draws a SIGKILL of rank 1 before the first checkpoint (the next attempt starts afresh and
    # must forget what the killed one recorded), a coordinator killed and restarted, and a SIGKILL of
    # rank 0 during a save;
    # `--kinds job` leaves out slurmctld and slurmdbd restarts, which would disturb the tests next to it.
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--seed",
            "96",
            "--faults",
            "3",
            "--kinds",
            "job",
            "--results",
            str(tmp_path / "RESULTS.md"),
            "--json",
            str(tmp_path / "chaos.json"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "chaos.json").read_text())
    assert [f["kind"] for f in figures["faults"]] == ["kill-rank", "coordinator-restart", "kill-during-save"]
    assert figures["finished"] and figures["weights_equal"]
    assert figures["samples_lost"] == figures["samples_repeated"] == 0
    assert figures["jobs"] == 3  # each kill resubmitted by the coordinator
    assert "## Chaos run" in (tmp_path / "RESULTS.md").read_text()
