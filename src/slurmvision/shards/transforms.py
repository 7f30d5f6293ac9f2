"""timm's transforms, split where it is fastest: PIL work in the loader workers, the rest on device.

Workers produce uint8 tensors (timm's `use_prefetcher=True` pipelines) — four times less
to copy than float32; normalisation, random erasing and mixup/cutmix run on the batch on
the training device.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.random_erasing import RandomErasing

from slurmvision.configs.schema import DataConfig


def train_transform(data: DataConfig, resolution: int):
    return create_transform(
        resolution, is_training=True, use_prefetcher=True, hflip=data.hflip, scale=tuple(data.crop_scale),
        color_jitter=data.color_jitter or None, auto_augment=data.auto_augment,
        interpolation=data.interpolation,
    )


def eval_transform(data: DataConfig, resolution: int):
    interpolation = "bicubic" if data.interpolation == "random" else data.interpolation
    return create_transform(resolution, is_training=False, use_prefetcher=True,
                            crop_pct=data.eval_resize_ratio, interpolation=interpolation)


class DeviceAugment:
    """Normalise on device, then random erasing and mixup/cutmix, seeded by (seed, step, rank)."""

    def __init__(self, data: DataConfig, num_classes: int, device: torch.device, seed: int, rank: int):
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.device, self.seed, self.rank = device, seed, rank
        self.num_classes, self.label_smoothing = num_classes, data.label_smoothing
        self.erase = RandomErasing(data.reprob, mode="pixel", device=str(device)) if data.reprob > 0 else None
        self.mixup: Optional[Mixup] = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, label_smoothing=data.label_smoothing,
                               num_classes=num_classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return (images - self.mean) / self.std

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch: normalised images and soft (mixup / smoothing) or hard targets."""
        images, targets = self.normalize(images), targets.to(self.device, non_blocking=True)
        if self.erase is None and self.mixup is None:
            return images, targets
        seed = int(np.random.SeedSequence([self.seed, step, self.rank, 11]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            if self.erase is not None:
                images = self.erase(images)
            # timm's Mixup needs an even batch; a batch shrunk by skipped samples goes without.
            if self.mixup is not None and len(images) % 2 == 0 and len(images) > 0:
                images, targets = self.mixup(images, targets)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return images, targets
