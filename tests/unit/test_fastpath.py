"""The GPU fast path, where the CPU can check it: the optimizer implementations give the same update,
a resume keeps the configured one, a failed torch.compile falls back with a clear message, its
cache goes to the run directory where that can hold it, and reading batches ahead leaves the data
position a checkpoint stores where it was.

The CUDA side (loss with each key on and off) is in tests/gpu/test_fastpath.py.
"""

import errno
import logging
import os
from itertools import islice

import pytest
import torch

from slurmvision.configs import load_config
from slurmvision.models import build_model
from slurmvision.shards.reader import LoaderState, TrainReader
from slurmvision.shards.writer import build_shards
from slurmvision.trainer import fastpath
from slurmvision.trainer.ddp import DDPEngine
from slurmvision.trainer.optim import build_optimizer, implementation
from slurmvision.trainer.prefetch import DeviceBatches

from .test_reader import data_config

pytestmark = pytest.mark.unit
SWIN = [
    "model.name=swinv2_tiny_window8_256",
    "model.kwargs={img_size: 32, patch_size: 4, window_size: 4, embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}",
]


def config(*overrides):
    return load_config("digits-demo", ["data.root=/x", *SWIN, "model.drop_path=0", *overrides], cluster="local")


def trained(fused: str, steps: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small Swin V2 after a few AdamW steps (weight decay, clipping) on fixed random batches."""
    cfg = config(f"optim.fused={fused}", "optim.lr=1e-2")
    torch.manual_seed(0)
    model = build_model(cfg.model, 4)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        targets = torch.randint(0, 4, (4,), generator=generator)
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("fused", ["foreach", "auto"])
def test_foreach_adamw_gives_the_plain_update_bit_for_bit(fused):
    plain, _ = trained("off")
    fast, optimizer = trained(fused)  # auto: foreach, on the CPU
    assert all(g["foreach"] for g in optimizer.param_groups)
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_adamw_gives_the_plain_update_to_rounding():
    """One step: the fused kernel rounds differently (a few ULPs), and further steps amplify that
    through Adam's normalisation as any change of kernel would."""
    plain, _ = trained("off", steps=1)
    fast, optimizer = trained("fused", steps=1)
    assert all(g["fused"] for g in optimizer.param_groups)
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_auto_is_fused_for_ddp_on_cuda_and_foreach_elsewhere():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert implementation(config(), cuda) == {"fused": True, "foreach": False}
    assert implementation(config(), cpu) == {"foreach": True}
    assert implementation(config("trainer.engine=deepspeed"), cuda) == {"foreach": True}
    assert implementation(config("optim.fused=off"), cuda) == {"foreach": False}


def test_a_resume_steps_with_the_configured_implementation_not_the_saved_one():
    _, saved = trained("off")
    cfg = config("optim.fused=foreach")
    engine = DDPEngine(build_model(cfg.model, 4), cfg, torch.device("cpu"))
    engine.load_state_dict({"model": engine.module.state_dict(), "optimizer": saved.state_dict()})
    assert all(g["foreach"] for g in engine.optimizer.param_groups)
    assert engine.optimizer.state_dict()["state"].keys() == saved.state_dict()["state"].keys()


def broken_compile(*args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")

    return compiled


def test_a_failed_compile_trains_on_eagerly_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = config("model.compile=true")
    torch.manual_seed(0)
    engine = DDPEngine(build_model(cfg.model, 4), cfg, torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="slurmvision.trainer"):
        out = engine.model(images)
        engine.model(images)
    torch.testing.assert_close(out, engine.module(images))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # once, not at every step
    assert "torch.compile failed (RuntimeError: InductorError: no working C++ compiler found)" in warnings[0]
    assert "without compilation" in warnings[0] and "model.compile=false" in warnings[0]


def test_torch_compile_raising_at_once_falls_back_too(monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unsupported)
    cfg = config("model.compile=true")
    with caplog.at_level(logging.WARNING, logger="slurmvision.trainer"):
        engine = DDPEngine(build_model(cfg.model, 4), cfg, torch.device("cpu"))
    assert engine.model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert "Dynamo is not supported on Python 3.99+" in caplog.text


def test_an_error_of_the_model_itself_is_raised_not_blamed_on_the_compiler(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = config("model.compile=true")
    engine = DDPEngine(build_model(cfg.model, 4), cfg, torch.device("cpu"))
    with pytest.raises(RuntimeError), caplog.at_level(logging.WARNING, logger="slurmvision.trainer"):
        engine.model(torch.randn(2, 5, 32, 32))  # 5 channels: the eager model fails as well
    assert "torch.compile failed" not in caplog.text


@pytest.fixture
def shards(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "shards", samples_per_shard=5, progress=False)
    return tmp_path / "shards"


def test_reading_ahead_keeps_the_position_of_the_next_batch_the_loop_takes(shards):
    """A checkpoint saved after k batches stores the position of batch k+1, although the
    prefetcher has read it already: a resume from it gets that batch again, and the rest."""
    plain = [b.keys for b in islice(iter(TrainReader(data_config(shards), seed=1, rank=0, world_size=2)), 9)]
    reader = TrainReader(data_config(shards), seed=1, rank=0, world_size=2)
    batches = DeviceBatches(reader, torch.device("cpu"), ahead=True)
    taken = [next(batches).keys for _ in range(5)]  # into the second epoch (12 samples per rank per epoch)
    saved = batches.position()
    assert saved != reader.state.to_dict()  # the reader itself is a batch further
    batches.close()
    resumed = TrainReader(data_config(shards), seed=1, rank=0, world_size=2, state=LoaderState.from_dict(saved))
    assert taken + [b.keys for b in islice(iter(resumed), 4)] == plain


def test_an_error_reading_ahead_is_raised_when_its_batch_is_taken():
    class Failing:
        state = LoaderState(0, [[1, 0]])

        def __iter__(self):
            yield "first"
            raise ValueError("bad shard")

    batches = DeviceBatches(Failing(), torch.device("cpu"), ahead=True)
    assert next(batches) == "first"  # the error of the batch after it waits for its turn
    with pytest.raises(ValueError, match="bad shard"):
        next(batches)


def test_the_compile_cache_goes_to_the_run_directory_unless_the_job_chose_another(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(fastpath.COMPILE_CACHE, default_cache_dir())  # what importing inductor sets
    fastpath.use_run_compile_cache(tmp_path / "run")
    assert os.environ[fastpath.COMPILE_CACHE] == str(tmp_path / "run" / "cache" / "compile")

    monkeypatch.setenv(fastpath.COMPILE_CACHE, str(tmp_path / "site-cache"))
    fastpath.use_run_compile_cache(tmp_path / "other-run")
    assert os.environ[fastpath.COMPILE_CACHE] == str(tmp_path / "site-cache")


def test_a_run_directory_without_flock_keeps_the_nodes_cache_and_says_why(tmp_path, monkeypatch, caplog):
    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.delenv(fastpath.COMPILE_CACHE, raising=False)
    monkeypatch.setattr(fastpath.fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="slurmvision.trainer"):
        fastpath.use_run_compile_cache(tmp_path / "run")
    assert fastpath.COMPILE_CACHE not in os.environ
    assert "cannot hold the compile cache (OSError" in caplog.text and "TORCHINDUCTOR_CACHE_DIR" in caplog.text
