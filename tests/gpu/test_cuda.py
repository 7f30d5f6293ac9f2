"""The CUDA paths: fp16 with a loss scale and bf16 autocast (DDP and DeepSpeed ZeRO-2), NCCL,
gradient checkpointing memory.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/gpu`.
"""

import json

import pytest
import torch

from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch.local import train_here

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains(tiny_shards, tmp_path, precision, engine):  # noqa: F811
    run_dir = tmp_path / precision
    engine_settings = ["trainer.engine=deepspeed", "trainer.zero_stage=2"] if engine == "deepspeed" else []
    results = train_here(
        tiny_config(
            tiny_shards,
            run_dir,
            f"trainer.precision={precision}",
            "trainer.max_steps=12",
            "optim.lr=3e-3",
            "data.batch_size=12",
            *engine_settings,
        ),
        nproc=1,
    )
    assert results["step"] == 12 and 0.0 <= results["top1"] <= 1.0
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    losses = [
        float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "progress" in line and "loss " in line
    ]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert inspect_checkpoint(run_dir)["step"] == 12


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across ranks needs 2 GPUs")
def test_two_ranks_over_nccl(tiny_shards, tmp_path):  # noqa: F811
    results = train_here(tiny_config(tiny_shards, tmp_path / "run", "trainer.max_steps=6"), nproc=2)
    assert results["step"] == 6


def test_grad_checkpointing_lowers_peak_memory_and_keeps_the_loss():
    import timm

    def peak_and_loss(checkpointing: bool) -> tuple[int, float]:
        torch.manual_seed(0)
        model = timm.create_model("swinv2_tiny_window8_256", num_classes=10).cuda()
        model.set_grad_checkpointing(checkpointing)
        images = torch.randn(16, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        return torch.cuda.max_memory_allocated(), float(loss.detach())

    plain, checkpointed = peak_and_loss(False), peak_and_loss(True)
    assert checkpointed[0] < 0.8 * plain[0], json.dumps({"plain": plain, "checkpointed": checkpointed})
    assert abs(checkpointed[1] - plain[1]) < 1e-2
