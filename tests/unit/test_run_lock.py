"""The trainer's run lock: one job trains a run directory at a time. Across ranks (no rank left
waiting in a collective) in tests/integration/test_run_guards.py."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from slurmvision.errors import RunError
from slurmvision.trainer import run_lock as run_lock_module
from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.run_lock import LOCK_NAME, run_lock

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


HOLDER = """
import fcntl, sys
f = open(sys.argv[1], "a+")
fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(sys.argv[2]); f.flush()
print("locked", flush=True)
sys.stdin.readline()
"""


def hold(path, text) -> subprocess.Popen:
    """The lock as another process holds it (a POSIX lock never conflicts within one process)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), text], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def can_take(path) -> bool:
    probe = (
        "import fcntl, sys\ntry:\n fcntl.lockf(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n sys.exit(1)"
    )
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0


def test_rank_0_holds_the_lock_while_it_trains_and_says_who_it_is(tmp_path):
    with run_lock(tmp_path, DistEnv(job_id="4242"), CPU):
        assert not can_take(tmp_path / LOCK_NAME)
        text = (tmp_path / LOCK_NAME).read_text()
        assert text.startswith("job 4242 on ") and f"pid {os.getpid()}" in text
    assert can_take(tmp_path / LOCK_NAME)


def test_a_run_another_job_trains_is_refused_in_one_line_naming_the_holder(tmp_path):
    other = hold(tmp_path / LOCK_NAME, "job 77 on gpu07, pid 1234, since 2024-05-01 10:00:00\n")
    entered = False
    with pytest.raises(RunError) as refused:
        with run_lock(tmp_path, DistEnv(job_id="78"), CPU):
            entered = True
    message = str(refused.value)
    assert not entered and "\n" not in message
    assert message.startswith(f"another job is training {tmp_path} (job 77 on gpu07, pid 1234, since 2024-05-01")
    other.communicate("\n")
    with run_lock(tmp_path, DistEnv(job_id="78"), CPU):  # once it is gone, the run is ours
        assert "job 78" in (tmp_path / LOCK_NAME).read_text()


def test_a_file_system_without_locks_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock_module.fcntl, "lockf", no_locks)
    entered = False
    with run_lock(tmp_path, DistEnv(), CPU):
        entered = True
    assert entered and "No locks available" in caplog.text and "training without the guard" in caplog.text


RANK_0_DIES = """
import os, sys, time, torch
from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.run_lock import run_lock
with run_lock(sys.argv[1], DistEnv(job_id="77"), torch.device("cpu")):
    if os.fork() == 0:  # a loader worker, forked after the lock was taken
        time.sleep(20)
        os._exit(0)
    os._exit(0)  # rank 0 SIGKILLed: no clean exit
"""


def test_a_loader_worker_that_outlives_rank_0_does_not_keep_the_run_locked(tmp_path):
    subprocess.run([sys.executable, "-c", RANK_0_DIES, str(tmp_path)], check=True)
    assert can_take(tmp_path / LOCK_NAME)
