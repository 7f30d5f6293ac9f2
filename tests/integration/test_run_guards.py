"""What stops or refuses a run, with the checkpoint kept: non-finite losses on one rank, a resume
with a config that changes what the checkpoint means, a run another job is training; and
`checkpoint inspect --json`."""

import fcntl
import json
import subprocess
import sys

import pytest

from slurmvision.configs import load_config
from slurmvision.errors import RunError
from slurmvision.launch import local
from slurmvision.launch.local import train_here

from .conftest import tiny_config
from .test_train_resume import train_cli

pytestmark = pytest.mark.integration


def _rank_with_nan_losses(target, args, rank, nproc, port, queue):
    """A rank of `train --nproc` whose rank 1 computes NaN at step 2 once, then at step 4 every time."""
    from slurmvision.trainer.loop import Trainer

    micro_step, poisoned = Trainer._micro_step, []

    def nan_on_rank_1(self, batch, micro, sync):
        if rank != 1 or not (self.step == 4 or (self.step == 2 and not poisoned)):
            return micro_step(self, batch, micro, sync)
        poisoned.append(self.step)
        # NaN through the forward pass: the backward's all-reduce carries it to every rank's gradients.
        hook = self.model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        try:
            return micro_step(self, batch, micro, sync)
        finally:
            hook.remove()

    Trainer._micro_step = nan_on_rank_1
    local._rank_main(target, args, rank, nproc, port, queue)


def test_non_finite_steps_are_skipped_on_every_rank_and_a_run_of_them_stops_with_the_checkpoint_kept(
    tiny_shards, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    settings = ["trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.nonfinite_budget=2"]
    monkeypatch.setattr(local, "_rank_main", _rank_with_nan_losses)
    with pytest.raises(
        RunError, match="2 non-finite steps in a row at step 4: stopped; the last good checkpoint is kept"
    ):
        train_here(tiny_config(tiny_shards, run, *settings), nproc=2)
    log = (run / "logs" / "rank-00000.log").read_text()  # rank 0's own losses were finite: the all-reduce told it
    assert "non-finite loss at step 2 on 1 rank(s): step skipped (1 in a row)" in log
    assert "non-finite loss at step 4 on 1 rank(s): step skipped (2 in a row)" in log
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]

    monkeypatch.undo()
    results = train_here(tiny_config(tiny_shards, run, *settings), nproc=2)  # the kept checkpoint is sound
    assert results["step"] == 8 and 0.0 <= results["top1"] <= 1.0
    assert "resumed from" in (run / "logs" / "rank-00000.log").read_text()


def test_a_resume_refuses_a_changed_meaning_names_the_keys_and_allows_harmless_or_permitted_changes(
    tiny_shards, tmp_path
):
    run = tmp_path / "run"
    base = ["trainer.max_steps=2"]
    config = tiny_config(tiny_shards, run, *base)
    lr, drop_path = config.optim.lr, config.model.drop_path
    assert train_cli(run, config, nproc=1).returncode == 0

    refused = train_cli(run, tiny_config(tiny_shards, run, *base, f"optim.lr={lr * 2}", "model.drop_path=0.2"), nproc=1)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    assert message.startswith("slurmvision: error: the config differs from the one") and "\n" not in message
    assert f"model.drop_path: {drop_path!r} -> 0.2; optim.lr: {lr!r} -> {lr * 2!r}" in message
    assert "trainer.allow_config_change=true" in message
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]  # untouched

    harmless = tiny_config(
        tiny_shards, run, *base, "trainer.log_every=5", "trainer.checkpoint_every=7", "data.workers=2"
    )
    assert train_cli(run, harmless, nproc=1).returncode == 0
    allowed = train_cli(
        run, tiny_config(tiny_shards, run, *base, f"optim.lr={lr * 2}", "trainer.allow_config_change=true"), nproc=1
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (
        f"with config changes (allowed): optim.lr: {lr!r} -> {lr * 2!r}"
        in (run / "logs" / "rank-00000.log").read_text()
    )

    inspected = subprocess.run(
        [sys.executable, "-m", "slurmvision", "checkpoint", "inspect", str(run), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(inspected.stdout)
    assert report["valid"] and report["problem"] is None and report["path"].endswith("step-00000002")
    assert (report["step"], report["world_size"], report["engine"]) == (2, 1, "ddp")
    assert len(report["params_sha256"]) == 64 and report["config_hash"] and report["samples_seen"] == 2 * 6


def test_a_run_another_job_is_training_is_refused_by_every_rank_at_once(tmp_path, monkeypatch):
    """Rank 0 finds the run lock held; rank 1 learns it in the same collective: it neither waits for
    rank 0 nor goes on alone."""
    outcomes, result = {}, local._result
    monkeypatch.setattr(local, "_result", lambda got, procs: outcomes.update(got) or result(got, procs))
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "train.lock", "a+") as other:  # the job already training this run
        fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("job 77 on gpu07, pid 1234, since 2024-05-01 10:00:00\n")
        other.flush()
        # No shards at data.root: a rank that went past the lock would fail on the data instead.
        config = load_config("digits-demo", ["data.root=/nonexistent"], cluster="local", run_dir=run)
        with pytest.raises(RunError, match=r"another job is training .* \(job 77 on gpu07, pid 1234, since 2024-05-01"):
            train_here(config, nproc=2)
    assert sorted(outcomes) == [0, 1]
    assert all(
        kind == "user" and payload.startswith("RunError:another job is training") for kind, payload in outcomes.values()
    ), outcomes
    assert not (run / "checkpoints").exists()
