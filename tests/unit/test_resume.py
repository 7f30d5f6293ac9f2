"""`slurmvision resume RUN`: the run's saved config, with the changes a resume may make (the rules of
a relaunch, configs/compare.py), and with --cluster, another cluster profile. The executor is faked:
what is checked happens before anything is submitted."""

import pytest

from slurmvision.cli import main
from slurmvision.configs import load_saved_config
from slurmvision.slurm.ledger import Ledger
from tests.unit.test_relaunch import submitted  # noqa: F401 (a fixture: the jobs of a faked executor)

pytestmark = pytest.mark.unit


@pytest.fixture
def run(tmp_path, submitted):
    """A run launched with a setting of its own (cluster.time_min=30); the jobs submitted."""
    run_dir = tmp_path / "run"
    assert main(["launch", "digits-demo", "data.root=/x", "cluster.time_min=30", "--run-dir", str(run_dir)]) == 0
    return run_dir, submitted


def test_resume_goes_on_with_the_saved_config_and_harmless_changes(run, capsys):
    run_dir, jobs = run
    assert main(["resume", str(run_dir), "trainer.log_every=7"]) == 0
    saved = load_saved_config(run_dir)
    assert jobs == ["local-0", "local-1"] and saved.trainer.log_every == 7
    assert saved.cluster.time_min == 30 and saved.data.root == "/x"  # kept from the launch, not the recipe's
    assert any(
        "local-1" in e["message"] and "trainer.log_every: 50 -> 7" in e["message"] for e in Ledger(run_dir).events()
    )


def test_resume_refuses_changes_of_what_the_checkpoints_mean_naming_the_keys(run, capsys):
    run_dir, jobs = run
    capsys.readouterr()
    assert main(["resume", str(run_dir), "optim.lr=0.1", "model.drop_path=0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.drop_path: 0.05 -> 0.2" in err and "optim.lr: 0.003 -> 0.1" in err
    assert jobs == ["local-0"] and load_saved_config(run_dir).optim.lr == 0.003


def test_resume_on_another_cluster_takes_that_profile(run, capsys):
    run_dir, _ = run
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--cluster", "devslurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=low" in out and "name: devslurm" in out and "executor: slurm" in out


def test_resume_of_a_directory_that_is_no_run_says_so(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "is not a slurmvision run directory" in capsys.readouterr().err


def files_of(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_dry_run_refuses_what_the_resume_would_refuse_with_the_same_line_and_writes_nothing(run, capsys):
    run_dir, jobs = run
    before = files_of(run_dir)
    capsys.readouterr()
    assert main(["resume", str(run_dir), "optim.lr=0.1", "model.drop_path=0.2", "--dry-run"]) == 2
    dry = capsys.readouterr()
    assert dry.out == "" and dry.err.count("\n") == 1 and "optim.lr: 0.003 -> 0.1" in dry.err
    assert "model.drop_path: 0.05 -> 0.2" in dry.err
    assert files_of(run_dir) == before and jobs == ["local-0"]
    assert main(["resume", str(run_dir), "optim.lr=0.1", "model.drop_path=0.2"]) == 2
    assert capsys.readouterr().err == dry.err  # what the real resume says, word for word


def test_a_dry_run_accepts_harmless_changes_and_names_them_without_writing(run, capsys):
    run_dir, jobs = run
    before = files_of(run_dir)
    capsys.readouterr()
    assert main(["resume", str(run_dir), "trainer.log_every=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# goes on with the run in" in out and "trainer.log_every: 50 -> 7" in out and "log_every: 7" in out
    assert files_of(run_dir) == before and jobs == ["local-0"]
    assert main(["resume", str(run_dir), "cluster.tasks_per_node=1", "--dry-run"]) == 2  # half the global batch
    assert "global batch (batch_size x ranks x grad_accum): 64 -> 32" in capsys.readouterr().err
    allowed = ["resume", str(run_dir), "optim.lr=0.1", "trainer.allow_config_change=true", "--dry-run"]
    assert main(allowed) == 0 and "optim.lr: 0.003 -> 0.1" in capsys.readouterr().out
    assert files_of(run_dir) == before and jobs == ["local-0"]
