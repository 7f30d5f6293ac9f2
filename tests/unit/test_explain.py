"""`slurmvision explain`: Grad-CAM pictures for Swin V2 and SG-Former whose maps are not blank, the pictures the
trainer can log (the model left as it was), and one clear line on user errors."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from slurmvision.cli import main
from slurmvision.evaluate.explain import gradcam, gradcam_pictures
from slurmvision.evaluate.model import load_model
from slurmvision.shards.reader import eval_batches
from slurmvision.shards.transforms import DeviceAugment

from .conftest import FAMILIES

pytestmark = pytest.mark.unit
CLASSES = ["cat", "dog", "ünï x"]


@pytest.fixture(params=list(FAMILIES))
def trained(request, trained_run):
    """(family, its run)"""
    return request.param, trained_run(request.param)


def _val_batch(run, count: int):
    """(model, uint8 val images as evaluation reads them, normalize)"""
    model, config, _, num_classes = load_model(run)
    images = next(iter(eval_batches(config.data, "val", rank=0, world_size=1))).images[:count]
    return model, images, DeviceAugment(config.data, num_classes, torch.device("cpu"), seed=0, rank=0).normalize


def test_the_cam_varies_across_the_image(trained):
    model, images, normalize = _val_batch(trained[1], 4)
    maps, probs = gradcam(model, normalize(images))
    assert maps.shape == (4, *images.shape[-2:]) and probs.shape == (4, 3)
    assert all(m.max() - m.min() > 0.5 and m.std() > 0.05 for m in maps)  # scaled to [0, 1], and not flat


def test_explain_writes_a_picture_per_image_with_its_top3(trained, colour_shards, tmp_path, capsys):
    family, run = trained
    # the same file name twice: the pictures get distinct names
    images = [colour_shards.parent / "images" / "val" / name / "img 1.png" for name in ("cat", "dog")]
    out = tmp_path / "cams"
    assert main(["explain", str(run), *map(str, images), "--out", str(out), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in records] == list(map(str, images))
    assert sorted(p.name for p in out.iterdir()) == ["img 1-0.png", "img 1-1.png"]
    side = FAMILIES[family][0]
    scale = math.ceil(224 / side)
    for record in records:
        probabilities = [t["probability"] for t in record["top"]]
        assert sorted(t["class"] for t in record["top"]) == sorted(CLASSES)  # 3 classes: the top-3 is all of them
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1)
        picture = np.asarray(Image.open(record["picture"]).convert("RGB")).astype(int)
        assert picture.shape == (side * scale + 3 * 22 + 8, 2 * side * scale, 3)
        image, overlay = picture[: side * scale, : side * scale], picture[: side * scale, side * scale :]
        assert np.abs(overlay - image).mean() > 10  # the heat map is drawn over the image

    assert main(["explain", str(run), str(images[0]), "--out", str(out)]) == 0  # text: one line per picture
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out / 'img 1.png'}: ") and line.count("%") == 3


def test_pictures_for_the_trainer_leave_the_model_as_it_was(trained):
    model, images, normalize = _val_batch(trained[1], 3)
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    for param in model.parameters():
        param.grad = torch.full_like(param, 7.0)
    pictures = gradcam_pictures(model, images, CLASSES, normalize)
    assert len(pictures) == 3 and all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in pictures)
    assert model.training and not first.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not first)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_user_errors_take_one_line(trained, tmp_path, capsys):
    run = str(trained[1])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    for arguments, message in [
        ([run, str(tmp_path / "missing.png")], "no image file"),
        ([str(tmp_path / "no-run"), str(not_an_image)], "no-run"),
        ([run, str(not_an_image)], "does not decode"),
    ]:
        assert main(["explain", *arguments, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_features_become_maps_from_any_layout():
    from slurmvision.evaluate.explain import feature_map

    grid = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 2, 3, 4)  # NHWC: 2 x 3 map of 4 channels
    expected = grid.permute(0, 3, 1, 2)
    assert torch.equal(feature_map(grid, (64, 96), channels=4, layout="NHWC"), expected)
    assert torch.equal(feature_map(grid, (64, 96), channels=4), expected)  # no output_fmt: found by the channels
    assert torch.equal(feature_map(expected, (64, 96), channels=4), expected)  # NCHW as it is
    tokens = torch.cat([torch.full((2, 1, 4), -1.0), grid.flatten(1, 2)], dim=1)  # a class token, then 6 tokens
    assert torch.equal(feature_map(tokens, (64, 96), channels=4, prefix_tokens=1), expected)
