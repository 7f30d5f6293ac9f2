"""The DeepSpeed engine on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu): ZeRO-1 (bf16) and ZeRO-2 learn,
stop and resume bit for bit, and resume on another world size."""

import json

import pytest

from slurmvision.evaluate.inspect import inspect_checkpoint

from .conftest import tiny_config
from .test_train_resume import RESUME_SETTINGS, audit, train_cli

pytestmark = pytest.mark.integration
DEEPSPEED = ["trainer.engine=deepspeed"]


def losses(run_dir):
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    return [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "progress" in line and "loss " in line]


def test_zero1_learns_in_bf16(tiny_shards, tmp_path):
    run = tmp_path / "run"
    done = train_cli(run, tiny_config(tiny_shards, run, *DEEPSPEED, "trainer.zero_stage=1", "trainer.precision=bf16",
                                      "trainer.max_steps=20", "optim.lr=3e-3", "data.batch_size=12"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["top1"] >= 0.8
    assert losses(run)[-1] < losses(run)[0]
    assert inspect_checkpoint(run)["engine"] == "deepspeed"


def test_zero2_stop_and_resume_is_exact(tiny_shards, tmp_path):
    settings = [*DEEPSPEED, "trainer.zero_stage=2", *RESUME_SETTINGS]
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *settings), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(straight)[-1] < losses(straight)[0]

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *settings)
    stopped = train_cli(split, config, nproc=2, stop_after_step=3)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert 3 <= json.loads(stopped.stdout)["step"] < 8
    resumed = train_cli(split, config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)


def test_zero2_resumes_on_one_rank_losing_and_repeating_nothing(tiny_shards, tmp_path):
    run = tmp_path / "run"
    settings = [*DEEPSPEED, "trainer.zero_stage=2", "trainer.max_steps=14", "data.batch_size=3", "data.audit=true",
                "data.shuffle_buffer=4"]
    first = train_cli(run, tiny_config(tiny_shards, run, *settings), nproc=2, stop_after_step=2)
    assert first.returncode == 3, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] < 12
    resumed = train_cli(run, tiny_config(tiny_shards, run, *settings, "trainer.grad_accum=2"), nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [k for entries in audit(run).values() for e in entries if e["epoch"] == 0 for k in e["keys"]]
    assert len(keys) == len(set(keys)) == 72
