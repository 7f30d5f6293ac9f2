"""Which config changes a resumed run may make.

A checkpoint means "these weights, trained this way on this data". Changing the model, the
data, the optimisation or the global batch changes that meaning and is refused on resume
unless `trainer.allow_config_change=true`. Changing how the run is executed or observed
(logging, checkpoint cadence, paths, cluster, workers, ranks at the same global batch) is not.
"""

from __future__ import annotations

from typing import Any

HARMLESS = (
    "run.",
    "cluster.",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.checkpoint_every_minutes",
    "trainer.keep_checkpoints",
    "trainer.async_checkpoint",
    "trainer.eval_every",
    "trainer.gradcam_images",
    "trainer.nonfinite_budget",
    "trainer.allow_config_change",
    "trainer.grad_accum",  # compared through the global batch instead
    "trainer.initial_scale_power",  # a resume continues from the saved loss scale
    "data.workers",
    "data.audit",
    "data.val_split",
    "data.bad_sample_budget",
    "data.remote_timeout_s",
    "data.eval_resize_ratio",
    "data.prefetch_to_device",
    "model.compile",
    "optim.fused",  # the same update, computed by other kernels
    "trainer.tf32",
    "trainer.cudnn_benchmark",
    "trainer.gradient_as_bucket_view",
    "model.grad_checkpointing",
    "model.channels_last",
    "model.pretrained_file",
    "model.cache_dir",  # where the same weights are read from
)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def meaningful_changes(old: dict, new: dict, harmless: tuple[str, ...] = HARMLESS) -> list[str]:
    """'key: old -> new' for every difference that changes what a checkpoint means (harmless=(): every one)."""
    before, after = flatten(old), flatten(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(harmless) or before.get(key) == after.get(key):
            continue
        changes.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes
