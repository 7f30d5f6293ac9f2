"""The DeepSpeed engine on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu): ZeRO-1 (bf16) learns; ZeRO-2 and
ZeRO-3 stop and resume bit for bit, and resume on another world size."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from slurmvision.evaluate.inspect import inspect_checkpoint

from slurmvision.trainer.distributed import free_port

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


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stop_and_resume_is_exact(tiny_shards, tmp_path, stage):
    settings = [*DEEPSPEED, f"trainer.zero_stage={stage}", *RESUME_SETTINGS]
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
    assert json.loads(resumed.stdout)["top1"] == json.loads(done.stdout)["top1"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_on_one_rank_losing_and_repeating_nothing(tiny_shards, tmp_path, stage):
    run = tmp_path / "run"
    settings = [*DEEPSPEED, f"trainer.zero_stage={stage}", "trainer.max_steps=14", "data.batch_size=3", "data.audit=true",
                "data.shuffle_buffer=4"]
    first = train_cli(run, tiny_config(tiny_shards, run, *settings), nproc=2, stop_after_step=2)
    assert first.returncode == 3, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] < 12
    resumed = train_cli(run, tiny_config(tiny_shards, run, *settings, "trainer.grad_accum=2"), nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [k for entries in audit(run).values() for e in entries if e["epoch"] == 0 for k in e["keys"]]
    assert len(keys) == len(set(keys)) == 72


def _engine_rank(rank: int, world: int, port: int, config, load_from: str, save_to: str) -> None:
    """One rank of a DeepSpeed engine: two steps of training, or a load; then rank 0 saves its state."""
    import torch.distributed as dist

    from slurmvision.models import build_model
    from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

    os.environ["DS_ACCELERATOR"] = "cpu"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    DeepSpeedEngine.GATHER_CHUNK = 1000  # several chunks per partition, the last one short
    engine = DeepSpeedEngine(build_model(config.model, 3), config, torch.device("cpu"), rank)
    if load_from:
        engine.load_state_dict(torch.load(load_from, weights_only=True))
    else:
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            images, targets = torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)
            engine.backward(torch.nn.functional.cross_entropy(engine.model(images), targets))
            engine.step()
    state = engine.state_dict()
    if rank == 0:
        torch.save(state, save_to)
    # Every rank done before any tears gloo down: a rank leaving while rank 0 still used the
    # group aborted in gloo's destructor ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, config, load_from: str, save_to: str) -> dict:
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_engine_rank, args=(r, world, port, config, load_from, save_to)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return torch.load(save_to, weights_only=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_state_is_the_same_after_loading_on_other_world_sizes(tiny_shards, tmp_path, stage):
    """Saved on 2 ranks, loaded on 3 (other padding), saved, loaded on 1: nothing changes."""
    config = tiny_config(tiny_shards, tmp_path / "run", *DEEPSPEED, f"trainer.zero_stage={stage}")
    saved = run_ranks(2, config, "", str(tmp_path / "two.pt"))
    on_three = run_ranks(3, config, str(tmp_path / "two.pt"), str(tmp_path / "three.pt"))
    on_one = run_ranks(1, config, str(tmp_path / "three.pt"), str(tmp_path / "one.pt"))
    assert saved["optimizer_state"] and all(moments for moments in saved["optimizer_state"].values())
    for state in (on_three, on_one):
        assert state["model"].keys() == saved["model"].keys()
        assert all(torch.equal(state["model"][k], saved["model"][k]) for k in saved["model"])
        for name, moments in saved["optimizer_state"].items():
            assert all(torch.equal(state["optimizer_state"][name][k], v) for k, v in moments.items()), name
        assert [float(t) for t in state["optimizer_steps"]] == [float(t) for t in saved["optimizer_steps"]] == [2.0] * len(saved["optimizer_steps"])
