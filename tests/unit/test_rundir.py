"""Run directories other users could write are refused before anything is submitted or unpickled."""

import os
import subprocess
import sys

import pytest

from slurmvision.slurm.ledger import Ledger
from slurmvision.slurm.rundir import UnsafeRunDir, check_run_dir

pytestmark = pytest.mark.unit


@pytest.fixture
def run_dir(tmp_path):
    old = os.umask(0o077)
    run = tmp_path / "run"
    for folder in ("slurm", "checkpoints/step-00000010", "ledger", "tb"):
        (run / folder).mkdir(parents=True)
    (run / "slurm" / "1_submitted.pkl").write_bytes(b"pickle")
    (run / "config.yaml").write_text("run: {}\n")
    yield run
    os.umask(old)


def test_a_private_run_directory_passes(run_dir):
    check_run_dir(run_dir)
    check_run_dir(run_dir.parent / "not-created-yet")


@pytest.mark.parametrize("path", ["", "slurm", "slurm/1_submitted.pkl", "checkpoints/step-00000010", "config.yaml"])
def test_a_group_writable_path_is_refused_with_the_fix(run_dir, path):
    target = run_dir / path
    target.chmod(target.stat().st_mode | 0o020)
    with pytest.raises(UnsafeRunDir, match=f"{target} is writable by group or others: chmod -R go-w {target}"):
        check_run_dir(run_dir)


def test_tensorboard_and_logs_may_be_group_writable(run_dir):
    (run_dir / "tb").chmod(0o770)
    check_run_dir(run_dir)


@pytest.mark.parametrize("name", ["slurm", "checkpoints"])
def test_a_symlink_out_of_the_run_directory_is_refused(run_dir, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(run_dir / name, tmp_path / "moved")
    (run_dir / name).symlink_to(elsewhere)
    with pytest.raises(UnsafeRunDir, match=f"{run_dir / name} is a symlink to {elsewhere}, outside the run"):
        check_run_dir(run_dir)


def test_a_run_directory_reached_through_a_symlink_is_fine(run_dir, tmp_path):
    (tmp_path / "runs").symlink_to(run_dir.parent)
    check_run_dir(tmp_path / "runs" / "run")


def test_files_are_private_whatever_the_umask(tmp_path):
    script = (
        "import os; from slurmvision.slurm.rundir import make_private; os.umask(0o002); make_private(); "
        f"os.mkdir({str(tmp_path / 'd')!r}); open({str(tmp_path / 'd' / 'f')!r}, 'w').close()"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o600


def test_the_check_each_attempt_runs_refuses_records_and_exits_non_zero(run_dir):
    (run_dir / "slurm").chmod(0o770)
    result = subprocess.run(
        [sys.executable, "-P", "-m", "slurmvision.slurm.rundir", str(run_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_JOB_ID": "42"},
    )
    assert result.returncode == 3 and "chmod -R go-w" in result.stderr and "Traceback" not in result.stderr
    assert "job 42 refused: unsafe run directory" in Ledger(run_dir).events()[-1]["message"]


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_file_of_another_user_is_refused(run_dir):
    os.chown(run_dir / "slurm" / "1_submitted.pkl", 65534, 65534)
    with pytest.raises(UnsafeRunDir, match="1_submitted.pkl belongs to uid 65534, not to you"):
        check_run_dir(run_dir)
