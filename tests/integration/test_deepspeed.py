"""The DeepSpeed engine on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu): ZeRO-1 (bf16, fp16) learns; ZeRO-3
(fp32), and ZeRO 0 and 2 in fp16 with a dynamic loss scale, stop and resume bit for bit;
ZeRO state resumes on another world size; fp16 overflows are skipped on every rank together."""

import json
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.trainer.distributed import free_port

from .conftest import TINY_MODEL, tiny_config
from .test_train_resume import BATCHNORM_MODEL, RESUME_SETTINGS, audit, train_cli

pytestmark = pytest.mark.integration
DEEPSPEED = ["trainer.engine=deepspeed"]


def losses(run_dir):
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    return [
        float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "progress" in line and "loss " in line
    ]


# fp16 learning is also shown by the fp16 stop-and-resume runs below; slow: `make test-all`.
@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_zero1_learns_in_mixed_precision(tiny_shards, tmp_path, precision):
    run = tmp_path / "run"
    done = train_cli(
        run,
        tiny_config(
            tiny_shards,
            run,
            *DEEPSPEED,
            "trainer.zero_stage=1",
            f"trainer.precision={precision}",
            "trainer.max_steps=20",
            "optim.lr=3e-3",
            "data.batch_size=12",
        ),
        nproc=2,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["top1"] >= 0.8
    assert losses(run)[-1] < losses(run)[0]
    assert inspect_checkpoint(run)["engine"] == "deepspeed"


def scalars(run_dir, tag: str) -> dict[int, float]:
    """A TensorBoard tag's values by step, across the event files of every attempt."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        values.update({e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return values


# fp16 runs on CPU too (torch autocast and its GradScaler), so its loss scale is tested here; ZeRO-2's
# fp32 state round-trips bit for bit in the world-size tests below. fp16 runs use the BatchNorm
# ResNet: CPU autocast computes F.normalize's norm in fp16, where its eps underflows, so Swin V2's
# cosine attention gives NaN for padded windows (CUDA autocast takes the norm in fp32).
# Stage 0 keeps only the weights flat, as stages 1/2 do with more: slow, `make test-all`.
@pytest.mark.parametrize("stage,precision", [(3, "fp32"), pytest.param(0, "fp16", marks=pytest.mark.slow), (2, "fp16")])
def test_zero_stop_and_resume_is_exact(tiny_shards, tmp_path, stage, precision):
    # A scale that overflows at first: the scale a resume starts from decides which steps are skipped.
    settings = [
        *DEEPSPEED,
        f"trainer.zero_stage={stage}",
        f"trainer.precision={precision}",
        "trainer.initial_scale_power=20",
        *RESUME_SETTINGS,
    ]
    model = BATCHNORM_MODEL if precision == "fp16" else TINY_MODEL
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *settings, model=model), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    if precision == "fp16":  # the scale came down after an overflow
        assert 0 < min(scalars(straight, "train/loss_scale").values()) < 2**20
    else:  # (the ResNet's loss is too noisy over 8 steps of mixup; fp16 learning is tested above)
        assert losses(straight)[-1] < losses(straight)[0]

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *settings, model=model)
    stopped = train_cli(split, config, nproc=2, stop_after_step=3)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert 3 <= json.loads(stopped.stdout)["step"] < 8
    resumed = train_cli(split, config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)
    assert json.loads(resumed.stdout)["top1"] == json.loads(done.stdout)["top1"]
    assert scalars(split, "train/loss_scale") == scalars(straight, "train/loss_scale")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_on_one_rank_losing_and_repeating_nothing(tiny_shards, tmp_path, stage):
    run = tmp_path / "run"
    settings = [
        *DEEPSPEED,
        f"trainer.zero_stage={stage}",
        "trainer.max_steps=14",
        "data.batch_size=3",
        "data.audit=true",
        "data.shuffle_buffer=4",
    ]
    first = train_cli(run, tiny_config(tiny_shards, run, *settings), nproc=2, stop_after_step=2)
    assert first.returncode == 3, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] < 12
    resumed = train_cli(run, tiny_config(tiny_shards, run, *settings, "trainer.grad_accum=2"), nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [k for entries in audit(run).values() for e in entries if e["epoch"] == 0 for k in e["keys"]]
    assert len(keys) == len(set(keys)) == 72


def _start_engine(rank: int, world: int, port: int, config):
    """A helper rank's DeepSpeed engine on CPU, in a gloo group of `world` ranks."""
    import torch.distributed as dist

    from slurmvision.models import build_model
    from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

    os.environ["DS_ACCELERATOR"] = "cpu"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    return DeepSpeedEngine(build_model(config.model, 3), config, torch.device("cpu"), rank)


def _random_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def _engine_rank(rank: int, world: int, port: int, config, load_from: str, save_to: str) -> None:
    """One rank of a DeepSpeed engine: two steps of training, or a load; then rank 0 saves its state."""
    from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

    DeepSpeedEngine.GATHER_CHUNK = 1000  # several chunks per partition, the last one short
    engine = _start_engine(rank, world, port, config)
    if load_from:
        engine.load_state_dict(torch.load(load_from, weights_only=True))
    else:
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            images, targets = _random_batch(generator)
            engine.backward(torch.nn.functional.cross_entropy(engine.model(images), targets))
            engine.step()
    state = engine.state_dict()
    if rank == 0:
        torch.save(state, save_to)
    _leave()


def _leave() -> None:
    """A helper rank's way out once its results are written: every rank meets, then the process
    exits without the interpreter's teardown, where DeepSpeed's CPU comm and gloo threads have
    aborted a finished rank ("terminate called without an active exception", exit code -6)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(target, world: int, config, *args) -> None:
    """`target(rank, world, port, config, *args)` on `world` processes; every one must succeed."""
    context, port = mp.get_context("spawn"), free_port()
    procs = [context.Process(target=target, args=(r, world, port, config, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def run_ranks(world: int, config, load_from: str, save_to: str) -> dict:
    spawn_ranks(_engine_rank, world, config, load_from, save_to)
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
        assert (
            [float(t) for t in state["optimizer_steps"]]
            == [float(t) for t in saved["optimizer_steps"]]
            == [2.0] * len(saved["optimizer_steps"])
        )


def _fp16_overflow_rank(rank: int, world: int, port: int, config, out: str) -> None:
    """ZeRO in fp16: rank 1 alone overflows once, then every rank overflows at every scale."""
    from slurmvision.errors import RunError

    engine = _start_engine(rank, world, port, config)
    generator, norms = torch.Generator().manual_seed(rank), []

    def step(blow_up: bool) -> bool:
        images, targets = _random_batch(generator)
        # A huge but finite loss: its gradients overflow fp16 at any loss scale.
        engine.backward(torch.nn.functional.cross_entropy(engine.model(images), targets) * (1e30 if blow_up else 1.0))
        norms.append(engine.step())
        return engine.model.was_step_applied()

    first_applied = next(i for i in range(8) if step(False))
    scale, weights = engine.loss_scale, {k: t.clone() for k, t in engine.model_state().items()}
    applied = step(blow_up=rank == 1)
    report = {
        "first_applied": first_applied,
        "norm": norms[first_applied],
        "scale": scale,
        "applied": applied,
        "scale_after": engine.loss_scale,
        "unchanged": all(torch.equal(t, weights[k]) for k, t in engine.model_state().items()),
    }
    for overflows in range(1, 40):
        try:
            step(blow_up=True)
        except RunError as err:
            report.update(error=str(err), overflows=overflows, last_scale=engine.loss_scale)
            break
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    _leave()


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_is_skipped_on_every_rank_and_a_scale_below_one_stops(tiny_shards, tmp_path, stage):
    config = tiny_config(
        tiny_shards,
        tmp_path / "run",
        *DEEPSPEED,
        f"trainer.zero_stage={stage}",
        "trainer.precision=fp16",
        "optim.clip_grad=1.0",
    )
    out = str(tmp_path / "report")
    spawn_ranks(_fp16_overflow_rank, 2, config, out)
    reports = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert reports[0] == reports[1]
    report = reports[0]
    # The reported gradient norm is unscaled (scaled, it would be tens of thousands).
    assert 0 < report["norm"] < 100
    # Rank 1's overflow: both ranks skipped the step, kept their weights and halved the scale.
    assert not report["applied"] and report["unchanged"] and report["scale_after"] == report["scale"] / 2
    # Halving down to 1 is allowed; the overflow that takes it below stops the run with advice.
    assert report["last_scale"] == 0.5 and report["overflows"] == math.log2(report["scale_after"]) + 1
    assert "fp16 loss scale fell below 1" in report["error"] and "trainer.precision=bf16" in report["error"]


def test_zero2_background_checkpoints_resume_exactly(tiny_shards, tmp_path):
    """trainer.async_checkpoint with ZeRO: the gather to rank 0 holds training up, the write does not."""
    import shutil

    settings = [*DEEPSPEED, "trainer.zero_stage=2", "trainer.async_checkpoint=true", *RESUME_SETTINGS]
    straight = tmp_path / "straight"
    done = train_cli(straight, tiny_config(tiny_shards, straight, *settings), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint step-00000003 saved in" in (straight / "logs" / "rank-00000.log").read_text()

    split = tmp_path / "split"
    config = tiny_config(tiny_shards, split, *settings)
    stopped = train_cli(split, config, nproc=2, stop_after_step=3)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    for later in (split / "checkpoints").glob("step-*"):  # resume from step 3's, written in the background
        if later.name != "step-00000003":
            shutil.rmtree(later)
    resumed = train_cli(split, config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000003 (step 3)" in (split / "logs" / "rank-00000.log").read_text()
    assert inspect_checkpoint(split)["params_sha256"] == inspect_checkpoint(straight)["params_sha256"]
    assert audit(split) == audit(straight)
