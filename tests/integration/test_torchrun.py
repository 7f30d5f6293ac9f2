"""`slurmvision train` under torchrun: each process is the rank torchrun started it as."""

import json
import os
import subprocess
import sys

import pytest

from slurmvision.configs import save_config
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.trainer.distributed import free_port

from .conftest import tiny_config
from .test_train_resume import train_command

pytestmark = pytest.mark.integration


def test_torchrun_starts_the_ranks_and_rank_0_reports(tiny_shards, tmp_path):
    run = tmp_path / "run"
    save_config(tiny_config(tiny_shards, run, "trainer.max_steps=4"), run)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    done = subprocess.run([*torchrun, *train_command(run)[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["step"] == 4  # one report, from rank 0
    assert inspect_checkpoint(run)["world_size"] == 2
    assert "step 4/4" in (run / "logs" / "rank-00000.log").read_text() and (run / "logs" / "rank-00001.log").exists()


def test_nproc_under_a_launcher_is_refused_in_one_line(tiny_shards, tmp_path):
    run = tmp_path / "run"
    save_config(tiny_config(tiny_shards, run), run)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    refused = subprocess.run(train_command(run, "--nproc", "2"), capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode != 0 and refused.stderr.strip() == (
        "slurmvision: error: --nproc 2 under torchrun or srun: each process is one rank already; drop --nproc"
    )
