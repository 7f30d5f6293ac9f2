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
