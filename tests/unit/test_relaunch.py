"""Relaunching into a run directory goes on with the run unless the config changes what its checkpoints
mean (the trainer's resume rules, configs/compare.py); accepted changes are saved and recorded.
The executor is faked: what is checked happens before anything is submitted."""

from types import SimpleNamespace

import pytest

from slurmvision.cli import main
from slurmvision.configs import load_saved_config
from slurmvision.launch import launcher
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit


@pytest.fixture
def submitted(monkeypatch):
    jobs: list[str] = []

    def submit(fn):
        jobs.append(f"local-{len(jobs)}")
        return SimpleNamespace(job_id=jobs[-1])

    monkeypatch.setattr(launcher, "make_executor", lambda *args: SimpleNamespace(submit=submit))
    return jobs


def launch(run_dir, *overrides):
    return main(["launch", "digits-demo", "data.root=/x", "--cluster", "local", "--run-dir", str(run_dir), *overrides])


def test_a_relaunch_with_changes_that_keep_the_checkpoints_meaning_goes_on(tmp_path, monkeypatch, submitted, capsys):
    assert launch(tmp_path / "run") == 0
    monkeypatch.chdir(tmp_path)  # the same directory, given relative this time
    assert launch("run", "cluster.time_min=30", "trainer.log_every=7", "model.grad_checkpointing=true") == 0
    assert submitted == ["local-0", "local-1"]
    saved = load_saved_config(tmp_path / "run")
    assert saved.trainer.log_every == 7 and saved.cluster.time_min == 30 and saved.model.grad_checkpointing
    recorded = [e["message"] for e in Ledger(tmp_path / "run").events()]
    assert any(
        "local-1" in m and "trainer.log_every: 50 -> 7" in m and "cluster.time_min: 60 -> 30" in m for m in recorded
    )


def test_a_relaunch_that_changes_what_the_checkpoints_mean_is_refused(tmp_path, submitted, capsys):
    run = tmp_path / "run"
    assert launch(run) == 0
    capsys.readouterr()
    assert launch(run, "optim.lr=0.1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr: 0.003 -> 0.1" in err and "trainer.allow_config_change=true" in err
    assert launch(run, "cluster.tasks_per_node=1") == 2  # half the ranks: half the global batch
    assert "global batch (batch_size x ranks x grad_accum): 64 -> 32" in capsys.readouterr().err
    assert submitted == ["local-0"] and load_saved_config(run).optim.lr == 0.003
    assert launch(run, "cluster.tasks_per_node=1", "trainer.grad_accum=2") == 0  # the same global batch
    assert launch(run, "optim.lr=0.1", "trainer.allow_config_change=true") == 0
    assert load_saved_config(run).optim.lr == 0.1 and len(submitted) == 3


def test_a_dry_run_into_a_run_directory_is_refused_as_the_launch_would_be_and_writes_nothing(
    tmp_path, submitted, capsys
):
    run = tmp_path / "run"
    assert launch(run) == 0
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert launch(run, "optim.lr=0.1", "--dry-run") == 2
    dry = capsys.readouterr()
    assert dry.out == "" and dry.err.count("\n") == 1 and "optim.lr: 0.003 -> 0.1" in dry.err
    assert launch(run, "optim.lr=0.1") == 2 and capsys.readouterr().err == dry.err
    assert launch(run, "cluster.time_min=30", "--dry-run") == 0
    assert "config changes: cluster.time_min: 60 -> 30" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before and submitted == ["local-0"]


def test_a_dry_run_into_a_new_run_directory_says_no_more_than_before(tmp_path, submitted, capsys):
    assert launch(tmp_path / "run", "--dry-run") == 0
    assert "# goes on" not in capsys.readouterr().out and not (tmp_path / "run").exists() and submitted == []
