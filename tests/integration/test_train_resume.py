"""Real 2-rank DDP training (gloo): it learns, it stops on a signal, and resumes bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurmvision.configs import save_config
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch import local
from slurmvision.launch.local import train_here

from .conftest import tiny_config

pytestmark = pytest.mark.integration
RESUME_SETTINGS = [
    "trainer.max_steps=8",
    "trainer.grad_accum=2",
    "data.audit=true",
    "data.scales=[12,16]",
    "data.scale_batch_sizes=[8,6]",
    "data.mixup=0.8",
    "data.cutmix=1.0",
    "data.reprob=0.25",
    "data.color_jitter=0.4",
    "optim.layer_decay=0.8",
    "optim.weight_decay_end=0.2",
]


def audit(run_dir: Path) -> dict:
    return {
        p.name: [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted((run_dir / "audit").glob("*.jsonl"))
    }


def train_command(run_dir: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "slurmvision",
        "train",
        str(run_dir / "config.yaml"),
        "--run-dir",
        str(run_dir),
        "--json",
        *options,
    ]


def train_cli(run_dir: Path, config, nproc: int, stop_after_step: int | None = None) -> subprocess.CompletedProcess:
    """`slurmvision train` in its own process group; optionally SIGUSR2 to one rank once a step is logged."""
    save_config(config, run_dir)
    command = train_command(run_dir, "--nproc", str(nproc))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if stop_after_step is not None:
        log = run_dir / "logs" / "rank-00000.log"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and f"step {stop_after_step}/" in log.read_text():
                break
            time.sleep(0.02)
        ranks = subprocess.run(
            ["pgrep", "-f", "multiprocessing.spawn", "-P", str(proc.pid)], capture_output=True, text=True
        )
        pids = sorted(int(p) for p in ranks.stdout.split())
        os.kill(pids[-1], signal.SIGUSR2)  # one rank only: the others must follow it
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_two_ranks_learn(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path / "run", "trainer.max_steps=30", "optim.lr=3e-3", "data.batch_size=12")
    results = train_here(config, nproc=2)
    assert results["top1"] >= 0.8, results
    losses = [
        line for line in (tmp_path / "run" / "logs" / "rank-00000.log").read_text().splitlines() if "loss" in line
    ]
    first, last = (float(line.split("loss ")[1].split()[0]) for line in (losses[0], losses[-1]))
    assert last < first
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_signal_on_one_rank_stops_all_and_resume_is_exact(tiny_shards, tmp_path):
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *RESUME_SETTINGS), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *RESUME_SETTINGS)
    stopped = train_cli(split, config, nproc=2, stop_after_step=3)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    stopped_at = json.loads(stopped.stdout)["step"]
    assert 3 <= stopped_at < 8
    resumed = train_cli(split, config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)
    assert json.loads(resumed.stdout)["top1"] == json.loads(done.stdout)["top1"]


BATCHNORM_MODEL = ["model.name=resnet10t", "model.kwargs={stem_width: 8}", "model.kwargs.channels=[8,16,16,16]"]


def _rank_signalled_mid_step(target, args, rank, nproc, port, queue):
    """A rank of `train --nproc` whose rank 1 gets SIGUSR2 after the first micro-batch of step 4."""
    from slurmvision.trainer.loop import Trainer

    micro_step = Trainer._micro_step

    def signalled(self, batch, micro, sync):
        loss = micro_step(self, batch, micro, sync)
        if rank == 1 and self.step == 3 and micro == 0:
            os.kill(os.getpid(), signal.SIGUSR2)
        return loss

    Trainer._micro_step = signalled
    local._rank_main(target, args, rank, nproc, port, queue)


def test_a_step_that_cannot_finish_in_time_is_cut_and_saved_from_its_start(tiny_shards, tmp_path, monkeypatch):
    """No time left after the warning (signal_delay_s=0): the step in flight is not finished."""
    settings = [*RESUME_SETTINGS, "model.drop_path=0.1", "cluster.signal_delay_s=0"]
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *settings, model=BATCHNORM_MODEL), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *settings, model=BATCHNORM_MODEL)
    monkeypatch.setattr(local, "_rank_main", _rank_signalled_mid_step)
    stopped = train_here(config, nproc=2)
    assert stopped == {"interrupted": True, "signal": "SIGUSR2", "step": 3}
    assert "step 4 cannot finish before the SIGUSR2 deadline" in (split / "logs" / "rank-00000.log").read_text()
    resumed = train_cli(split, config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # BatchNorm statistics are in the hash: the cut step's forward passes were undone.
    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)


def _rank_warned_after_step_3s_save(target, args, rank, nproc, port, queue):
    """A rank of `train --nproc` whose rank 1 gets the time-limit warning right after step 3's periodic save."""
    from slurmvision.trainer.loop import Trainer

    save = Trainer.save

    def saved_then_warned(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if rank == 1 and self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    Trainer.save = saved_then_warned
    local._rank_main(target, args, rank, nproc, port, queue)


def _rank_warned_after_resuming(target, args, rank, nproc, port, queue):
    """A rank of `train --nproc` whose rank 1 gets the time-limit warning as soon as it has resumed."""
    from slurmvision.trainer import loop

    resume = loop.resume

    def resumed_then_warned(*given, **named):
        restored = resume(*given, **named)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return restored

    loop.resume = resumed_then_warned
    local._rank_main(target, args, rank, nproc, port, queue)


def test_a_stop_right_after_a_save_or_a_resume_saves_nothing_again_and_reports_the_profiles_signal(
    tiny_shards, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    config = tiny_config(tiny_shards, run, "trainer.max_steps=8", "cluster.signal=USR1")
    stopped = {"interrupted": True, "signal": "SIGUSR1", "step": 3}
    monkeypatch.setattr(local, "_rank_main", _rank_warned_after_step_3s_save)
    assert train_here(config, nproc=2) == stopped
    meta = run / "checkpoints" / "step-00000003" / "meta.json"
    saved_at = meta.stat().st_mtime_ns
    monkeypatch.setattr(local, "_rank_main", _rank_warned_after_resuming)
    assert train_here(config, nproc=2) == stopped
    assert meta.stat().st_mtime_ns == saved_at
    log = (run / "logs" / "rank-00000.log").read_text()
    assert log.count("checkpoint step-00000003 saved") == 1 and log.count("(it was on disk already)") == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000003"]


def test_resume_on_fewer_ranks_loses_and_repeats_nothing_at_the_same_global_batch(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # 12 steps per epoch: the stop lands inside epoch 0 and the change of ranks splits it.
    settings = ["trainer.max_steps=14", "data.batch_size=3", "data.audit=true", "data.shuffle_buffer=4"]
    config = tiny_config(tiny_shards, run, *settings)
    first = train_cli(run, config, nproc=2, stop_after_step=2)
    assert first.returncode == 3, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] < 12
    refused = train_cli(run, config, nproc=1)
    assert refused.returncode == 2 and "global batch" in refused.stderr and "grad_accum" in refused.stderr
    # Same global batch on one rank: twice the accumulation.
    resumed = train_cli(run, tiny_config(tiny_shards, run, *settings, "trainer.grad_accum=2"), nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [(e["epoch"], k) for entries in audit(run).values() for e in entries for k in e["keys"]]
    per_epoch = {}
    for epoch, key in keys:
        per_epoch.setdefault(epoch, []).append(key)
    for epoch, epoch_keys in per_epoch.items():
        assert len(epoch_keys) == len(set(epoch_keys)), f"a sample repeated in epoch {epoch}"
    assert len(per_epoch[0]) == 72  # every train sample of epoch 0, across the change from 2 ranks to 1


def test_sigterm_to_every_process_of_the_job_stops_cleanly(tiny_shards, tmp_path):
    """Slurm's preemption signals all the job's processes, loader workers included."""
    run = tmp_path / "run"
    config = tiny_config(tiny_shards, run, "trainer.max_steps=60", "trainer.checkpoint_every=100")
    save_config(config, run)
    command = [
        sys.executable,
        "-m",
        "slurmvision",
        "train",
        str(run / "config.yaml"),
        "--run-dir",
        str(run),
        "--nproc",
        "2",
        "--json",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run / "logs" / "rank-00000.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "step 5/" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    # Into the epoch boundary, where the loader starts new workers.
    time.sleep(0.05)
    pids = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        if pid != proc.pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    stopped = json.loads(out)
    assert stopped["signal"] == "SIGTERM" and inspect_checkpoint(run)["step"] == stopped["step"]


WORKERS_OF_A_KILLED_RANK = """
import multiprocessing, sys, time
from slurmvision.configs import load_config
from slurmvision.shards.reader import TrainReader
overrides = [f"data.root={sys.argv[1]}", "data.workers=2", "data.batch_size=2"]
config = load_config("digits-demo", overrides, cluster="local", run_dir=sys.argv[2])
batches = iter(TrainReader(config.data, seed=0, rank=0, world_size=1))
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(120)
"""


def test_the_loader_workers_of_a_rank_killed_by_sigkill_do_not_outlive_it(tiny_shards, tmp_path):
    rank = subprocess.Popen(
        [sys.executable, "-c", WORKERS_OF_A_KILLED_RANK, str(tiny_shards), str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )
    workers = [int(pid) for pid in rank.stdout.readline().split()]
    assert len(workers) == 2
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def _rank_writing_slowly_stopped_after_step_3s_save(target, args, rank, nproc, port, queue):
    """A rank of `train --nproc` whose checkpoint files take a second to write, and whose rank 1 gets
    SIGUSR2 as soon as step 3's background save has started."""
    from slurmvision.trainer import checkpoint
    from slurmvision.trainer.loop import Trainer

    real_save, save = checkpoint.save_file, Trainer.save

    def slow(obj, path):
        time.sleep(1.0)
        return real_save(obj, path)

    def saved_then_stopped(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if rank == 1 and self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)

    checkpoint.save_file, Trainer.save = slow, saved_then_stopped
    local._rank_main(target, args, rank, nproc, port, queue)


def test_background_checkpoints_resume_exactly_and_a_stop_waits_for_the_pending_one(tiny_shards, tmp_path, monkeypatch):
    settings = [*RESUME_SETTINGS, "trainer.async_checkpoint=true"]
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *settings), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (straight / "logs" / "rank-00000.log").read_text()
    for step in (3, 6):  # written in the background, committed at a later step; the last one before the end
        assert f"checkpoint step-0000000{step} saved in" in log and f"checkpoint of step {step} copied in" in log
    assert [inspect_checkpoint(straight / "checkpoints" / f"step-0000000{s}")["valid"] for s in (3, 6, 8)] == [True] * 3

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *settings)
    monkeypatch.setattr(local, "_rank_main", _rank_writing_slowly_stopped_after_step_3s_save)
    assert train_here(config, nproc=2) == {"interrupted": True, "signal": "SIGUSR2", "step": 3}
    log = (split / "logs" / "rank-00000.log").read_text()
    assert "waiting for the background save of step 3" in log and "(it was on disk already)" in log
    monkeypatch.undo()
    resumed = train_cli(split, config, nproc=2)  # from the checkpoint written in the background
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {split / 'checkpoints' / 'step-00000003'} (step 3)"
        in (split / "logs" / "rank-00000.log").read_text()
    )

    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)
    assert json.loads(resumed.stdout)["top1"] == json.loads(done.stdout)["top1"]
