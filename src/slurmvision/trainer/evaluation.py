"""Evaluation over all ranks: every sample of a split once, metrics reduced across ranks."""

from __future__ import annotations

import torch

from slurmvision.configs import Config
from slurmvision.evaluate.metrics import ClassificationMetrics, confusion_image
from slurmvision.evaluate.tta import predict
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.reader import eval_batches
from slurmvision.shards.transforms import DeviceAugment
from slurmvision.trainer.distributed import DistEnv


def evaluate(model: torch.nn.Module, config: Config, env: DistEnv, device: torch.device, num_classes: int,
             split: str | None = None, tta: str = "none") -> dict:
    split = split or config.data.val_split
    augment = DeviceAugment(config.data, num_classes, device, seed=0, rank=env.rank)
    metrics = ClassificationMetrics(num_classes)
    was_training = model.training
    model.eval()
    for batch in eval_batches(config.data, split, rank=env.rank, world_size=env.world_size,
                              pin_memory=device.type == "cuda"):
        if len(batch.keys):
            metrics.update(predict(model, augment.normalize(batch.images), tta), batch.targets.to(device))
    model.train(was_training)
    metrics.all_reduce()
    results = metrics.compute()
    results["split"] = split
    classes = Manifest.load(config.data.root).classes
    results["confusion_image"] = confusion_image(results["confusion"], classes)
    return results
