"""timm's transforms, split where it is fastest: PIL work in the loader workers, the rest on device.

Workers turn encoded bytes into uint8 tensors (timm's `use_prefetcher=True` pipelines) —
four times less to copy than float32; colour jitter, normalisation, random erasing and
mixup/cutmix run on the batch on the training device.

JPEGs are decoded at a reduced DCT scale (PIL `draft`) whenever the pixels that will be
used still come out at or above the output size: the random crop is drawn from the image
header first, so a small crop of a large photo decodes a quarter or an eighth of the
pixels, at no loss of resolution in the crop.
"""

from __future__ import annotations

import io
import math
import random
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.transforms import Compose, InterpolationMode, RandomHorizontalFlip
from torchvision.transforms.functional import pil_modes_mapping
from torchvision.transforms.v2.functional import resize

from slurmvision.configs.data import DataConfig

TENSOR_RESIZE = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


def _open(encoded: bytes) -> Image.Image:
    """The image, not decoded yet (only its header is read)."""
    return Image.open(io.BytesIO(encoded))


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; `convert` would copy an image that is RGB already (most JPEGs)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _draft(image: Image.Image, factor: float) -> tuple[float, float]:
    """Let a JPEG decode at most `factor` times smaller; the (x, y) scale it will decode at."""
    width, height = image.size
    if factor >= 2:
        image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    return image.size[0] / width, image.size[1] / height


class DraftRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation (its crop sampling and interpolation choice,
    in the same RNG order) on encoded bytes, decoding only at the resolution the crop needs.

    Bilinear and bicubic resizing from a crop of whole pixels run on the uint8 tensor: torch's
    vectorised antialiased kernels are about four times faster than PIL's, with the same result.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation, rest: Compose):
        self.crop = crop
        # Whether the transforms after the crop take a tensor (flip, to-tensor) or need PIL (RandAugment).
        self.tensor_rest = all(isinstance(t, (RandomHorizontalFlip, MaybePILToTensor)) for t in rest.transforms)

    def __call__(self, encoded: bytes) -> Image.Image:
        crop = self.crop
        image = _open(encoded)
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
        modes = crop.interpolation if isinstance(crop.interpolation, (tuple, list)) else (crop.interpolation,)
        interpolation = random.choice(modes) if len(modes) > 1 else modes[0]
        out_height, out_width = crop.size
        sx, sy = _draft(image, min(width / out_width, height / out_height))
        if (sx, sy) != (1.0, 1.0) or interpolation not in TENSOR_RESIZE:
            # A drafted image puts the crop's edges between pixels: only PIL resizes from such a box.
            box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
            return _rgb(image).resize((out_width, out_height), pil_modes_mapping[interpolation], box=box)
        pixels = torch.from_numpy(np.array(_rgb(image))).permute(2, 0, 1)
        resized = resize(
            pixels[:, top : top + height, left : left + width],
            [out_height, out_width],
            interpolation=interpolation,
            antialias=True,
        )
        return resized if self.tensor_rest else Image.fromarray(resized.permute(1, 2, 0).numpy())


class DraftDecode:
    """Decode for an eval transform whose first step resizes the shorter side to `shorter`."""

    def __init__(self, shorter: int):
        self.shorter = shorter

    def __call__(self, encoded: bytes) -> Image.Image:
        image = _open(encoded)
        _draft(image, min(image.size) / self.shorter)
        return _rgb(image)


class EncodedTransform:
    """bytes -> uint8 CHW tensor: a drafting decode, then the rest of timm's pipeline."""

    def __init__(self, decode: Callable[[bytes], Image.Image], rest: Compose):
        self.decode, self.rest = decode, rest

    def __call__(self, encoded: bytes) -> torch.Tensor:
        return self.rest(self.decode(encoded))


def jitter_on_device(data: DataConfig) -> bool:
    """Colour jitter runs on the batch (BatchColorJitter) unless timm's auto-augment replaces it."""
    return bool(data.color_jitter) and not data.auto_augment


def train_transform(data: DataConfig, resolution: int) -> EncodedTransform:
    pipeline = create_transform(
        resolution,
        is_training=True,
        use_prefetcher=True,
        hflip=data.hflip,
        scale=tuple(data.crop_scale),
        color_jitter=None if jitter_on_device(data) else data.color_jitter or None,
        auto_augment=data.auto_augment,
        interpolation=data.interpolation,
    )
    first, *rest = pipeline.transforms
    if not isinstance(first, RandomResizedCropAndInterpolation):
        raise TypeError(f"timm's training pipeline starts with {type(first).__name__}, expected a random resized crop")
    rest = Compose(rest)
    return EncodedTransform(DraftRandomResizedCrop(first, rest), rest)


def eval_transform(data: DataConfig, resolution: int) -> EncodedTransform:
    interpolation = "bicubic" if data.interpolation == "random" else data.interpolation
    pipeline = create_transform(
        resolution, is_training=False, use_prefetcher=True, crop_pct=data.eval_resize_ratio, interpolation=interpolation
    )
    return EncodedTransform(DraftDecode(math.floor(resolution / data.eval_resize_ratio)), pipeline)


class BatchColorJitter:
    """torchvision's ColorJitter (brightness, contrast, saturation) for a batch on the device.

    Taken out of the loader workers, where three PIL passes over every image were about a third
    of a worker's time; on a GPU the batch takes microseconds. The same distribution: each
    sample draws its factors uniformly from [max(0, 1 - strength), 1 + strength] and its own order of
    the three adjustments, and values are clamped after each, on 0..255 floats.
    """

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        low, high = max(0.0, 1 - self.strength), 1 + self.strength
        factors = low + (high - low) * torch.rand(n, 3, device=images.device)
        order = torch.argsort(torch.rand(n, 3, device=images.device), dim=1)
        return self.apply(images, factors, order)

    @staticmethod
    def apply(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """`factors[i]` (brightness, contrast, saturation) applied to sample i in the order `order[i]`."""
        for position in range(3):
            adjustment = order[:, position]
            factor = factors.gather(1, adjustment[:, None]).view(-1, 1, 1, 1)
            gray = _grayscale(images)
            # brightness blends with black, contrast with the mean grey level, saturation with the grey image
            target = torch.where(
                adjustment.view(-1, 1, 1, 1) == 0,
                torch.zeros_like(gray),
                torch.where(adjustment.view(-1, 1, 1, 1) == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray),
            )
            images = (factor * images + (1 - factor) * target).clamp_(0, 255)
        return images


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's rgb_to_grayscale


class DeviceAugment:
    """Colour jitter, normalisation, random erasing and mixup/cutmix on the device, seeded by (seed, step, rank)."""

    def __init__(self, data: DataConfig, num_classes: int, device: torch.device, seed: int, rank: int):
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.device, self.seed, self.rank = device, seed, rank
        self.jitter = BatchColorJitter(data.color_jitter) if jitter_on_device(data) else None
        self.num_classes, self.label_smoothing = num_classes, data.label_smoothing
        self.erase = RandomErasing(data.reprob, mode="pixel", device=str(device)) if data.reprob > 0 else None
        self.mixup: Optional[Mixup] = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=data.mixup,
                cutmix_alpha=data.cutmix,
                label_smoothing=data.label_smoothing,
                num_classes=num_classes,
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return (images - self.mean) / self.std

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch: normalised images and soft (mixup / smoothing) or hard targets."""
        targets = targets.to(self.device, non_blocking=True)
        if self.jitter is None and self.erase is None and self.mixup is None:
            return self.normalize(images), targets
        images = images.to(self.device, non_blocking=True).float()
        seed = int(np.random.SeedSequence([self.seed, step, self.rank, 11]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            if self.jitter is not None:
                images = self.jitter(images)
            images = self.normalize(images)
            if self.erase is not None:
                images = self.erase(images)
            # timm's Mixup needs an even batch; a batch shrunk by skipped samples goes without.
            if self.mixup is not None and len(images) % 2 == 0 and len(images) > 0:
                images, targets = self.mixup(images, targets)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return images, targets
