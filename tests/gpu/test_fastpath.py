"""Each GPU fast-path key on against all of them off: the same data, and the loss within tolerance.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/gpu`. The keys'
CPU-checkable sides are in tests/unit/test_fastpath.py; their speed in benchmarks/gpu.sh.
"""

import json
from pathlib import Path

import pytest
import torch

from slurmvision.launch.local import train_here

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ALL_OFF = [
    "optim.fused=off",
    "trainer.tf32=false",
    "trainer.cudnn_benchmark=false",
    "trainer.gradient_as_bucket_view=false",
    "data.prefetch_to_device=false",
    "model.compile=false",
    "model.channels_last=false",
]
KEYS = {
    "fused AdamW": "optim.fused=fused",
    "foreach AdamW": "optim.fused=foreach",
    "TF32": "trainer.tf32=true",
    "cudnn benchmark": "trainer.cudnn_benchmark=true",
    "prefetch to device": "data.prefetch_to_device=true",
    "compile": "model.compile=true",
    "channels last": "model.channels_last=true",
}
STEPS = 8


def losses(run_dir: Path) -> list[float]:
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    return [
        float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "progress" in line and "loss " in line
    ]


def audit(run_dir: Path) -> list:
    return [json.loads(line) for path in sorted((run_dir / "audit").glob("*.jsonl")) for line in path.open()]


def run(shards, run_dir: Path, *overrides: str, nproc: int = 1) -> tuple[list[float], list]:
    settings = [
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every=4",  # a save in the middle: a prefetched batch must not move its position
        "trainer.precision=fp32",  # TF32 acts on fp32 matmuls
        "optim.lr=3e-3",
        "data.batch_size=12",
        "data.scales=[12,16]",
        "data.scale_batch_sizes=[16,12]",
        "data.audit=true",
        *ALL_OFF,
        *overrides,
    ]
    results = train_here(tiny_config(shards, run_dir, *settings), nproc=nproc)
    assert results["step"] == STEPS
    return losses(run_dir), audit(run_dir)


@pytest.fixture(scope="module")
def baseline(tiny_shards, tmp_path_factory):  # noqa: F811
    return run(tiny_shards, tmp_path_factory.mktemp("off") / "run")


@pytest.mark.parametrize("key", list(KEYS))
def test_each_key_keeps_the_data_and_the_loss(tiny_shards, tmp_path, baseline, key):  # noqa: F811
    off_losses, off_audit = baseline
    on_losses, on_audit = run(tiny_shards, tmp_path / "run", KEYS[key])
    assert on_audit == off_audit  # the same samples in the same steps
    assert len(on_losses) == len(off_losses) == STEPS
    # Other kernels (TF32's 10-bit mantissa, fused reductions, compiled graphs) round differently.
    assert max(abs(a - b) for a, b in zip(on_losses, off_losses)) < 2e-2, (on_losses, off_losses)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="gradient bucket views need DDP on 2 GPUs")
def test_gradient_bucket_views_keep_the_loss_on_two_ranks(tiny_shards, tmp_path):  # noqa: F811
    off, off_audit = run(tiny_shards, tmp_path / "off", nproc=2)
    on, on_audit = run(tiny_shards, tmp_path / "on", "trainer.gradient_as_bucket_view=true", nproc=2)
    assert on_audit == off_audit
    assert max(abs(a - b) for a, b in zip(on, off)) < 1e-4, (on, off)


def test_the_defaults_keep_the_data_and_the_loss(tiny_shards, tmp_path, baseline):  # noqa: F811
    """The defaults (fused AdamW, TF32, cudnn benchmark, bucket views, prefetch to device) all at once."""
    defaults = tiny_config(tiny_shards, tmp_path / "defaults")
    assert (defaults.optim.fused, defaults.trainer.tf32, defaults.trainer.cudnn_benchmark) == ("auto", True, True)
    assert defaults.trainer.gradient_as_bucket_view and defaults.data.prefetch_to_device
    on = ["optim.fused=auto", "trainer.tf32=true", "trainer.cudnn_benchmark=true", "data.prefetch_to_device=true"]
    on_losses, on_audit = run(tiny_shards, tmp_path / "run", *on)
    assert on_audit == baseline[1]
    assert max(abs(a - b) for a, b in zip(on_losses, baseline[0])) < 2e-2, (on_losses, baseline[0])
