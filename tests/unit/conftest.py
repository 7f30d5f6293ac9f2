"""Tiny real runs (shards, a model, a checkpoint) for the commands that read a run: export, explain."""

import json
from pathlib import Path

import pytest
import torch

# Swin V2 and SG-Former, each as small as it goes; SG-Former's sides are multiples of 32.
FAMILIES = {
    "swinv2": (
        32,
        [
            "model.name=swinv2_tiny_window8_256",
            'model.kwargs={"img_size": 32, "patch_size": 2, '
            '"window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}',
        ],
    ),
    "sgformer": (64, ["model.name=sgformer_pico", 'model.kwargs={"img_size": 64}']),
}


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """Three classes, each its own colour (plus noise): a model learns them in a few steps."""
    from slurmvision.shards.writer import build_shards
    from tests.integration.conftest import write_imagefolder

    base = tmp_path_factory.mktemp("colours")
    build_shards(write_imagefolder(base / "images", size=32), base / "shards", samples_per_shard=16, progress=False)
    return base / "shards"


def make_run(run_dir: Path, shards: Path, family: str, train_steps: int = 0) -> Path:
    """A run directory with one checkpoint of a `family` model, trained `train_steps` Adam steps on the shards'
    train split (0: random weights)."""
    from slurmvision.configs import load_config, to_dict
    from slurmvision.models import build_model
    from slurmvision.shards.reader import eval_batches
    from slurmvision.shards.transforms import DeviceAugment
    from slurmvision.trainer.checkpoint import CheckpointManager, rng_state
    from slurmvision.trainer.distributed import DistEnv

    size, model_overrides = FAMILIES[family]
    config = load_config(
        "digits-demo",
        [f"data.root={shards}", f"data.img_size={size}", "data.batch_size=12", "data.workers=0", *model_overrides],
        run_dir=run_dir,
    )
    torch.manual_seed(0)
    model = build_model(config.model, 3)
    if train_steps:
        normalize = DeviceAugment(config.data, 3, torch.device("cpu"), seed=0, rank=0).normalize
        batches = [(normalize(b.images), b.targets) for b in eval_batches(config.data, "train", rank=0, world_size=1)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(train_steps):
            images, targets = batches[step % len(batches)]
            torch.nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    manager = CheckpointManager(run_dir / "checkpoints", DistEnv(), keep=1)
    manager.save(
        1,
        {"config": json.dumps(to_dict(config)), "engine": {"model": model.state_dict()}, "step": 1},
        {"rng": rng_state()},
        {"step": 1, "epoch": 0, "classes": ["cat", "dog", "ünï x"]},
    )
    return run_dir


@pytest.fixture(scope="session")
def trained_run(colour_shards, tmp_path_factory):
    """family -> a run of that family trained a few steps (its class's colour is what it looks at), made once."""
    runs = {}

    def run_of(family: str) -> Path:
        if family not in runs:
            runs[family] = make_run(tmp_path_factory.mktemp(family) / "run", colour_shards, family, train_steps=8)
        return runs[family]

    return run_of
