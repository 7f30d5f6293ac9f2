"""`launch` refuses a second job on a run whose newest job is still queued or running, unless
--force; the coordinator's resubmissions are never refused. Slurm's answers are faked here
(the real queue is in tests/slurm)."""

from types import SimpleNamespace

import pytest

from slurmvision.cli import main
from slurmvision.configs import load_config, save_config
from slurmvision.errors import RunError
from slurmvision.launch import launcher, watcher
from slurmvision.launch.coordinator import Coordinator
from slurmvision.slurm.causes import SlurmAttempt
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit


class FakeSlurm:
    """A cluster that takes every job (numbered from 500) and says which are queued."""

    def __init__(self, monkeypatch):
        self.queued: set[str] = set()
        self.asked: list[str] = []
        self.submitted: list[str] = []
        monkeypatch.setattr(launcher, "in_queue", self.in_queue)
        monkeypatch.setattr(launcher, "validate_cluster", lambda cluster: None)
        monkeypatch.setattr(launcher, "make_executor", lambda *args: self)
        self.watchers: list[str] = []  # the training job each watcher waits for
        monkeypatch.setattr(
            watcher, "submit_watcher", lambda config, after, begin_in_s, tries: self.watchers.append(after) or "900"
        )

    def in_queue(self, job_id):
        self.asked.append(job_id)
        return job_id in self.queued

    def update_parameters(self, **kwargs):
        pass

    def submit(self, fn):
        self.submitted.append(str(500 + len(self.submitted)))
        return SimpleNamespace(job_id=self.submitted[-1])


def launch(run_dir, *extra):
    return main(["launch", "digits-demo", "data.root=/x", "--cluster", "devslurm", "--run-dir", str(run_dir), *extra])


def test_a_second_launch_is_refused_while_the_first_job_is_queued_unless_forced(tmp_path, monkeypatch, capsys):
    slurm = FakeSlurm(monkeypatch)
    run_dir = tmp_path / "run"
    assert launch(run_dir) == 0 and slurm.submitted == ["500"] and slurm.watchers == ["500"]
    slurm.queued.add("500")
    capsys.readouterr()

    assert launch(run_dir) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "job 500 of" in err and "still queued or running" in err and "`scancel 500`" in err and "--force" in err
    assert slurm.submitted == ["500"] and len(Ledger(run_dir).jobs()) == 1

    assert launch(run_dir, "--force") == 0
    assert "warning: --force" in capsys.readouterr().err
    assert slurm.submitted == ["500", "501"] and slurm.asked == ["500"]  # --force asks the queue nothing

    slurm.queued.clear()  # the newest job (501) has ended: a relaunch resumes the run
    assert launch(run_dir) == 0 and slurm.asked[-1] == "501" and slurm.submitted[-1] == "502"
    assert [j["job_id"] for j in Ledger(run_dir).jobs()] == ["500", "501", "502"]


def test_without_slurm_there_is_no_queue_to_ask(tmp_path, monkeypatch):
    slurm = FakeSlurm(monkeypatch)
    config = load_config("digits-demo", ["data.root=/x"], cluster="local", run_dir=tmp_path / "run")
    save_config(config, tmp_path / "run")
    Ledger(tmp_path / "run").add_job("local-1", "local")
    assert launcher.submit(config).job_id == "500" and not slurm.asked


def test_the_coordinators_resubmission_is_not_refused(tmp_path, monkeypatch):
    slurm = FakeSlurm(monkeypatch)
    run_dir = tmp_path / "run"
    config = load_config(
        "digits-demo", ["data.root=/x", "cluster.retry_backoff_s=0"], cluster="devslurm", run_dir=run_dir
    )
    save_config(config, run_dir)
    Ledger(run_dir).add_job("41", "devslurm")
    slurm.queued.add("41")  # a queue that lags the end sacct already shows must not block the resubmission
    coordinator = Coordinator(
        run_dir,
        poll_s=0,
        attempts_of=lambda job_id: [SlurmAttempt.parse("TIMEOUT|n1|0:0")],
        queued=lambda job_id: False,
    )
    assert coordinator.tick().action == "resubmit"
    assert slurm.submitted == ["500"] and not slurm.asked
    with pytest.raises(RunError, match="job 500 of .* still queued or running"):  # while `launch` itself is refused
        slurm.queued.add("500")
        launcher.submit(config)
