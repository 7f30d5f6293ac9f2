"""Evaluate or export the model of a checkpoint (on this machine, one process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from slurmvision.configs import from_stored


def load_model(checkpoint_path: str | Path, data_root: Optional[str] = None):
    """(model in eval mode with the checkpoint's weights — EMA ones if the run kept them, config, checkpoint);
    `data_root` replaces the stored one (which must not be a pipe: command)."""
    from slurmvision.models import build_model
    from slurmvision.shards.reader import ShardSet
    from slurmvision.trainer.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(checkpoint_path)
    state = checkpoint.load_state()
    config = from_stored(json.loads(state["config"]), f"{checkpoint.path}", data_root)
    num_classes = config.model.num_classes or ShardSet.load(config.data.root, config.data.train_split).num_classes
    model_config = config.model
    model_config.pretrained, model_config.finetune_from = False, None
    model = build_model(model_config, num_classes)
    model.load_state_dict(state.get("ema") or state["engine"]["model"])
    return model.eval(), config, checkpoint, num_classes


def evaluate_checkpoint(checkpoint_path: str | Path, split: str = "val", tta: str = "none",
                        data_root: Optional[str] = None) -> dict:
    import torch

    from slurmvision.trainer.distributed import DistEnv
    from slurmvision.trainer.evaluation import evaluate

    model, config, checkpoint, num_classes = load_model(checkpoint_path, data_root)
    results = evaluate(model, config, DistEnv(), torch.device("cpu"), num_classes, split=split, tta=tta)
    results.pop("confusion_image", None)
    results.update(step=checkpoint.step, checkpoint=str(checkpoint.path), tta=tta)
    return results


def export_checkpoint(checkpoint_path: str | Path, out: str | Path, opset: int = 18,
                      data_root: Optional[str] = None) -> dict:
    from slurmvision.evaluate.export import export_onnx

    model, config, checkpoint, _ = load_model(checkpoint_path, data_root)
    result = export_onnx(model, out, img_size=config.data.img_size, opset=opset)
    return {**result, "checkpoint": str(checkpoint.path)}
