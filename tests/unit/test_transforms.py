"""Drafting decode: the same crops as timm's pipeline, from fewer decoded pixels."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from slurmvision.configs.data import DataConfig
from slurmvision.shards.reader import transform_sample
from slurmvision.shards.transforms import DraftDecode, _draft, _open, eval_transform, train_transform

pytestmark = pytest.mark.unit


def photo(width=800, height=600, fmt="JPEG") -> bytes:
    from skimage import data as photos

    image = Image.fromarray(photos.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format=fmt, quality=92)
    return out.getvalue()


def reference(pipeline, encoded: bytes, seed: int) -> torch.Tensor:
    """timm's own pipeline on the fully decoded image."""
    random.seed(seed)
    torch.manual_seed(seed)
    return pipeline(Image.open(io.BytesIO(encoded)).convert("RGB"))


def drafted(transform, encoded: bytes, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)  # RandAugment draws its ops from numpy
    torch.manual_seed(seed)
    return transform(encoded)


def test_draft_decodes_fewer_pixels_but_never_below_the_request():
    image = _open(photo())
    assert _draft(image, 4.5) == (0.25, 0.25) and image.size == (200, 150)
    image = _open(photo())
    assert _draft(image, 1.9) == (1.0, 1.0) and image.convert("RGB").size == (800, 600)
    png = _open(photo(fmt="PNG"))
    assert _draft(png, 8) == (1.0, 1.0)  # only JPEG has DCT scaling


@pytest.mark.parametrize("crop_scale", [[0.02, 0.05], [0.08, 1.0], [0.9, 1.0]])
def test_train_crops_match_timms_pipeline(crop_scale):
    data = DataConfig(root="x", hflip=0.5, color_jitter=0.0, crop_scale=crop_scale, interpolation="bicubic")
    ours = train_transform(data, 64)
    from timm.data import create_transform

    theirs = create_transform(
        64,
        is_training=True,
        use_prefetcher=True,
        hflip=0.5,
        scale=tuple(crop_scale),
        color_jitter=None,
        interpolation="bicubic",
    )
    encoded = photo()
    for seed in range(6):
        a, b = drafted(ours, encoded, seed), reference(theirs, encoded, seed)
        assert a.dtype == torch.uint8 and a.shape == b.shape == (3, 64, 64)
        # Same crop and flip; only the decoding scale and resampling differ.
        assert (a.float() - b.float()).abs().mean() < 6, seed


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_an_undrafted_crop_is_resized_as_pil_does(interpolation):
    """PNGs are never drafted: the crop is whole pixels, resized by torch's kernels (PIL's for nearest)."""
    data = DataConfig(root="x", hflip=0.5, color_jitter=0.0, interpolation=interpolation)
    ours = train_transform(data, 96)
    from timm.data import create_transform

    theirs = create_transform(
        96, is_training=True, use_prefetcher=True, hflip=0.5, color_jitter=None, interpolation=interpolation
    )
    encoded = photo(320, 240, fmt="PNG")
    for seed in range(6):
        a, b = drafted(ours, encoded, seed), reference(theirs, encoded, seed)
        assert (a.float() - b.float()).abs().mean() < 0.05 and (a.int() - b.int()).abs().max() <= 2, seed


def test_random_interpolation_and_randaugment_run_on_bytes():
    data = DataConfig(root="x", interpolation="random", auto_augment="rand-m9-mstd0.5-inc1")
    transform = train_transform(data, 48)
    outputs = {drafted(transform, photo(), seed).sum().item() for seed in range(4)}
    assert len(outputs) == 4  # seeded, different per seed
    assert drafted(transform, photo(), 3).equal(drafted(transform, photo(), 3))


def test_eval_decodes_at_least_the_resize_size_and_matches_timm():
    data = DataConfig(root="x", eval_resize_ratio=0.875)
    image = _open(photo(1600, 1200))
    DraftDecode(256)(photo(1600, 1200))
    _draft(image, min(image.size) / 256)
    assert min(image.size) >= 256 and image.size == (400, 300)
    from timm.data import create_transform

    theirs = create_transform(224, is_training=False, use_prefetcher=True, crop_pct=0.875, interpolation="bicubic")
    a, b = eval_transform(data, 224)(photo(1600, 1200)), reference(theirs, photo(1600, 1200), 0)
    assert a.shape == b.shape == (3, 224, 224) and (a.float() - b.float()).abs().mean() < 4


def test_grayscale_and_png_images_come_out_rgb():
    gray = io.BytesIO()
    Image.fromarray(np.full((300, 200), 90, np.uint8)).save(gray, format="JPEG")
    transform = train_transform(DataConfig(root="x"), 32)
    for encoded in (gray.getvalue(), photo(fmt="PNG")):
        assert drafted(transform, encoded, 0).shape == (3, 32, 32)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_bytes_are_a_value_error(damage):
    encoded = photo()
    encoded = b"not an image at all" if damage == "garbage" else encoded[: len(encoded) // 3]
    with pytest.raises(ValueError, match="does not decode"):
        transform_sample(train_transform(DataConfig(root="x"), 32), encoded)


def test_batch_colour_jitter_is_torchvisions_per_sample():
    from torchvision.transforms import functional as TF

    from slurmvision.shards.transforms import BatchColorJitter

    images = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(photo(64, 48))))] * 3)).permute(0, 3, 1, 2)
    factors = torch.tensor([[1.3, 0.7, 1.1], [0.6, 1.4, 0.8], [1.0, 1.0, 1.0]])
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    ours = BatchColorJitter.apply(images.float(), factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(3):
        expected = images[i].float() / 255
        for op in order[i]:
            expected = adjust[op](expected, float(factors[i, op]))
        assert torch.allclose(ours[i] / 255, expected, atol=1e-5), i
    assert torch.equal(ours[2], images[2].float())  # factors of 1 change nothing


def test_batch_colour_jitter_draws_each_samples_factors_and_order():
    from slurmvision.shards.transforms import BatchColorJitter

    torch.manual_seed(0)
    images = torch.full((512, 3, 4, 4), 60.0)
    images[:, 0] = 120.0  # a colour: saturation changes it too
    out = BatchColorJitter(0.4)(images)
    ratios = out[:, 0, 0, 0] / 120
    assert len(set(ratios.tolist())) > 500 and ratios.min() < 0.6 and ratios.max() > 1.4
    assert out.min() >= 0 and out.max() <= 255
