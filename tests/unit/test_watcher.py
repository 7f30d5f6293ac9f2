"""The watcher chain: the sbatch line of a watcher job, its script, and what each watcher
submits next (the real chain runs in tests/slurm/test_watcher.py)."""

import shlex
from pathlib import Path

import pytest

from slurmvision.configs import load_config, load_saved_config, save_config
from slurmvision.launch import coordinator, watcher
from slurmvision.launch.coordinator import Decision
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit


@pytest.fixture
def config(tmp_path):
    config = load_config(
        "digits-demo",
        ["data.root=/x", "cluster.setup=[module load python]"],
        cluster="a100",
        run_dir=tmp_path / "my run",
    )
    save_config(config, config.run.dir)
    return config


def test_a_watcher_waits_for_the_job_in_the_profiles_partition_or_its_own(config):
    args = watcher.sbatch_args(config, after="42", begin_in_s=14.2)
    assert "--dependency=afterany:42" in args and "--begin=now+15" in args and "--partition=gpu" in args
    assert "--account=my-project" in args and "--time=10" in args and "--cpus-per-task=1" in args
    assert args[-1].endswith("my run/slurm/watcher.sh") and not any(a.startswith("--gres") for a in args)
    config.cluster.watcher_partition, config.cluster.watcher_qos = "cpu", "short"
    args = watcher.sbatch_args(config, after=None, begin_in_s=0)
    assert "--partition=cpu" in args and "--qos=short" in args
    assert not any(a.startswith(("--dependency", "--begin")) for a in args)


def test_the_watcher_script_runs_the_setup_then_one_look(config):
    script = watcher.watcher_script(config).splitlines()
    assert script[:3] == ["#!/bin/bash", "set -e", "module load python"]
    command = shlex.split(script[-1])
    assert command[0] == "exec" and command[-3:] == ["coordinate", str(Path(config.run.dir).resolve()), "--once"]


class FakeCoordinator:
    decision = Decision("wait")

    def __init__(self, run_dir):
        self.ledger, self.config = Ledger(run_dir), load_saved_config(run_dir)

    def once(self):
        return self.decision


@pytest.mark.parametrize(
    "decision, after, begin",
    [
        (Decision("wait"), "7", watcher.ACCOUNTING_LAG_S),  # the job runs: wake when it ends
        (Decision("resubmit", "crash"), "7", watcher.ACCOUNTING_LAG_S),  # the new job (7 in this ledger)
        (Decision("wait", "backing off", delay_s=120), None, 120),  # nothing to wait for but the time
        (Decision("finished", "run finished"), None, None),  # the chain ends
        (Decision("stop", "run stopped: oom"), None, None),
    ],
)
def test_each_watcher_submits_its_successor_until_the_run_is_over(config, monkeypatch, decision, after, begin):
    Ledger(config.run.dir).add_job("7", "a100")
    Ledger(config.run.dir).put("watcher", {"job_id": "8", "after": "7"})
    FakeCoordinator.decision = decision
    monkeypatch.setattr(coordinator, "Coordinator", FakeCoordinator)
    successors = []
    monkeypatch.setattr(
        watcher, "submit_watcher", lambda config, after, begin_in_s, tries: successors.append((after, begin_in_s))
    )
    assert watcher.watch(config.run.dir) is decision
    if decision.final:
        assert successors == [] and Ledger(config.run.dir).get("watcher") is None
    else:
        assert successors == [(after, begin)]


def test_an_elastic_runs_watcher_looks_at_regular_intervals(config):
    """A job Slurm requeued after a node failure waits for that node: no dependency would wake its watcher."""
    config.cluster.nodes, config.cluster.min_nodes, config.cluster.watcher_every_s = 2, 1, 45
    assert watcher.next_look(config, "7") == (None, 45)
    assert watcher.next_look(config, "7", delay_s=120) == (None, 120)
