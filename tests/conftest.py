"""Shared fixtures: a small ImageFolder tree with awkward names and mixed formats."""

from pathlib import Path

import numpy as np
import pytest

CLASSES = ("class a", "Ünï", "02_x")


def make_imagefolder(root: Path, per_class: int = 8, splits=("train", "val"), size=(20, 17)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    formats = (".png", ".JPG", ".webp", ".jpeg")
    for split in splits:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else max(2, per_class // 2)):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img.{i}{formats[(i + c) % len(formats)]}")
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "images")
