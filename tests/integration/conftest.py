"""Tiny real data and a tiny real model for multi-process tests on 2 CPU cores."""

from pathlib import Path

import numpy as np
import pytest

from slurmvision.configs import load_config

TINY_MODEL = [
    "model.name=swinv2_tiny_window8_256",
    "model.kwargs.img_size=16",
    "model.kwargs.patch_size=2",
    "model.kwargs.window_size=4",
    "model.kwargs.embed_dim=16",
    "model.kwargs.depths=[1,1]",
    "model.kwargs.num_heads=[1,2]",
    "model.kwargs.strict_img_size=false",
]


def write_imagefolder(root: Path, classes=("cat", "dog", "ünï x"), per_class=24, size=16) -> Path:
    """Learnable little images: each class has its own colour, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3)) + np.eye(3, dtype=int)[c % 3] * 180
                ext = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img {i}{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from slurmvision.shards.writer import build_shards

    base = tmp_path_factory.mktemp("data")
    build_shards(write_imagefolder(base / "images"), base / "shards", samples_per_shard=10, progress=False)
    return base / "shards"


def tiny_config(shards: Path, run_dir: Path, *overrides: str, model=TINY_MODEL):
    return load_config(
        "digits-demo",
        [
            f"data.root={shards}",
            "data.batch_size=6",
            "data.workers=1",
            "data.shuffle_buffer=8",
            "data.img_size=16",
            "trainer.log_every=1",
            "trainer.checkpoint_every=3",
            "optim.warmup_steps=2",
            *model,
            *overrides,
        ],
        cluster="local",
        run_dir=run_dir,
    )
