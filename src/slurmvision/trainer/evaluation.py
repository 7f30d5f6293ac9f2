"""Evaluation over all ranks: every sample of a split once, metrics reduced across ranks."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from slurmvision.configs import Config
from slurmvision.errors import DataError
from slurmvision.evaluate.metrics import ClassificationMetrics, confusion_image
from slurmvision.evaluate.tta import predict
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.reader import Batch, eval_batches
from slurmvision.shards.transforms import DeviceAugment
from slurmvision.trainer.distributed import DistEnv

log = logging.getLogger(__name__)


def evaluate(
    model: torch.nn.Module,
    config: Config,
    env: DistEnv,
    device: torch.device,
    num_classes: int,
    split: str | None = None,
    tta: str = "none",
    scales: Optional[Sequence[int]] = None,
    classes: Optional[Sequence[str]] = None,
) -> dict:
    """Metrics of `model` on `split` of config.data.root, read at each of `scales` (default: data.img_size;
    several for the multiscale TTA modes). `classes` are the model's class names (default: the data's);
    the data's labels are mapped to them by name, so any shards holding some of them can be evaluated.
    Per-class entries carry their class name."""
    split = split or config.data.val_split
    scales = list(scales or [config.data.img_size])
    data_classes = Manifest.load(config.data.root).classes
    names = list(classes or data_classes)
    names += [str(i) for i in range(len(names), num_classes)]  # model.num_classes beyond the manifest's
    labels = label_map(data_classes, names, config.data.root).to(device)
    augment = DeviceAugment(config.data, num_classes, device, seed=0, rank=env.rank)
    metrics = ClassificationMetrics(num_classes)
    was_training = model.training
    model.eval()
    # One pass per scale over the same samples in the same order: their batches line up.
    passes = [
        eval_batches(
            config.data,
            split,
            rank=env.rank,
            world_size=env.world_size,
            resolution=size,
            pin_memory=device.type == "cuda",
        )
        for size in scales
    ]
    try:
        for batches in zip(*passes):
            first = _lined_up(batches, scales, config.data.root)
            if len(first.keys):
                views = [augment.normalize(batch.images) for batch in batches]
                metrics.update(predict(model, views, tta), labels[first.targets.to(device)])
    finally:
        # zip leaves all passes but the first unfinished: shut their loader workers down now, on any way
        # out, by the loader's own protocol (they ignore SIGTERM; see Trainer.fit).
        for batches in passes:
            batches.close()
    model.train(was_training)
    metrics.all_reduce()
    results = metrics.compute()
    results["per_class"] = [{"class": name, **entry} for name, entry in zip(names, results["per_class"])]
    results["split"] = split
    results["confusion_image"] = confusion_image(results["confusion"], names)
    return results


def _lined_up(batches: Sequence[Batch], scales: Sequence[int], root: str) -> Batch:
    """The first scale's batch, once the batches of every scale hold the same samples: TTA combines the
    views of each sample. The bad samples left out are logged."""
    first = batches[0]
    for shard, key, problem in first.bad:
        log.warning("left out bad sample %s in %s: %s", key, shard, problem)
    if any(batch.keys != first.keys for batch in batches):
        keys = [set(batch.keys) for batch in batches]
        odd = set.union(*keys) - set.intersection(*keys)
        raise DataError(
            f"samples {', '.join(sorted(odd)[:3])} decode at some of the sizes {scales} only: "
            f"run `slurmvision shards verify {root}`"
        )
    return first


def label_map(data_classes: Sequence[str], model_classes: Sequence[str], root: str) -> torch.Tensor:
    """Index i holds the model's index of the data's class i; a data class the model lacks is a DataError."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        known = ", ".join(map(repr, model_classes[:10])) + (", ..." if len(model_classes) > 10 else "")
        raise DataError(
            f"{root} has classes the model was not trained on: {shown}; name the class folders as the "
            f"model's classes ({known})"
        )
    return torch.tensor([index[name] for name in data_classes], dtype=torch.int64)
