"""`slurmvision logs`: the right file of the right rank, cut to the right attempt of a job Slurm requeued
(its files hold every attempt), and the coordinator's logs."""

import io
import subprocess
import sys
from datetime import datetime
from types import SimpleNamespace

import pytest

from slurmvision.cli import main
from slurmvision.launch import logs
from slurmvision.slurm import ledger as ledger_module
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit
T0 = datetime(2030, 1, 1, 12, 0, 0).timestamp()


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,000")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Job 100 ran twice (requeued at T0+100): its files hold both attempts, as submitit and Slurm write them."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for restart, start in enumerate((T0, T0 + 100)):
        monkeypatch.setattr(ledger_module, "time", SimpleNamespace(time=lambda s=start: s + 5, time_ns=lambda: 0))
        Ledger(run_dir, writer=f"attempt-{restart}").attempt_started(
            "100", restart, nodes="n1", world_size=2, step=50 * restart, checkpoint=None
        )
    slurm = run_dir / "slurm"
    slurm.mkdir()
    (slurm / "100_0_log.out").write_text(
        f"submitit INFO ({_stamp(T0)}) - Starting with JobEnvironment(job_id=100)\nfirst print\n"
        f"submitit INFO ({_stamp(T0 + 100)}) - Starting with JobEnvironment(job_id=100)\nsecond print\n"
    )
    (slurm / "100_0_log.err").write_text(
        f"{_stamp(T0 + 3)} [rank 0] INFO trainer: first attempt trains\nTraceback (most recent call last):\n  boom\n"
        f"{_stamp(T0 + 104)} [rank 0] INFO trainer: resumed at step 50\n"
    )
    return run_dir


def logs_of(run_dir, capsys, *options) -> str:
    assert main(["logs", str(run_dir), *options]) == 0
    return capsys.readouterr().out


def test_the_newest_attempt_of_rank_0_by_default_and_any_other_by_number_or_name(run, capsys):
    assert logs_of(run, capsys) == f"{_stamp(T0 + 104)} [rank 0] INFO trainer: resumed at step 50\n"
    first = logs_of(run, capsys, "--attempt", "1")
    assert "first attempt trains" in first and "boom" in first and "resumed" not in first
    assert logs_of(run, capsys, "--attempt", "100.0") == first
    assert logs_of(run, capsys, "--attempt", "1", "--stream", "stdout").splitlines()[1:] == ["first print"]


def test_a_missing_rank_or_attempt_is_one_line_naming_what_exists(run, capsys):
    assert main(["logs", str(run), "--rank", "3"]) == 2
    assert "100_3_log.err or " in capsys.readouterr().err
    assert main(["logs", str(run), "--attempt", "3"]) == 2
    assert "give 1 to 2 (-1 the newest) or one of 100.0, 100.1" in capsys.readouterr().err


def test_the_coordinator_and_watcher_logs(run, capsys):
    assert main(["logs", str(run), "--coordinator"]) == 2
    (run / "logs").mkdir()
    (run / "logs" / "watcher-7.log").write_text("watcher looked\n")
    assert logs_of(run, capsys, "--coordinator") == "watcher looked\n"


def test_follow_prints_what_is_appended(run):
    path, out, calls = run / "slurm" / "100_0_log.err", io.StringIO(), []

    def stop():
        calls.append(1)
        if len(calls) == 1:
            with open(path, "a") as f:
                f.write("a new line\n")
        return len(calls) > 2

    logs.follow(path, out=out, poll_s=0, stop=stop)
    assert out.getvalue() == "a new line\n"


def test_logs_and_resume_stay_off_torch(run):
    code = (
        "import contextlib, io, sys\nfrom slurmvision.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    main(['logs', {str(run)!r}]), main(['resume', {str(run)!r}, '--dry-run'])\n"
        "print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
