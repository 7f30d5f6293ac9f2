"""The model of a checkpoint, built to evaluate: its config, its classes, the weights it was evaluated with."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from slurmvision.checkpoints import evaluated_weights, open_checkpoint
from slurmvision.configs import ModelConfig, from_stored
from slurmvision.errors import ConfigError
from slurmvision.shards.manifest import Manifest

# Switches of timm models built for one input size that let them take others with the same weights, and
# compute the same at the trained size: Swin's padded windows with masks made for each input, ViT's position
# embedding resampled to the patch grid. Tried in this order; a model that takes neither is built as it was.
ANY_SIZE_KWARGS = ({"strict_img_size": False}, {"dynamic_img_size": True})


def load_model(checkpoint_path: str | Path, data_root: Optional[str] = None, any_size: bool = False):
    """(model in eval mode with the checkpoint's weights — EMA ones if the run kept them, config, checkpoint,
    number of classes); `data_root` replaces the stored one (which must not be a pipe: command). With
    `any_size`, the model is built to take other image sizes than it trained at where it can (ANY_SIZE_KWARGS)."""
    checkpoint = open_checkpoint(checkpoint_path)
    state = checkpoint.load_state()
    config = from_stored(json.loads(state["config"]), f"{checkpoint.path}", data_root)
    # The classes the run trained on, not those of the data to evaluate (for checkpoints from before the
    # meta named them: the data's manifest, as the trainer counted them).
    trained_on = checkpoint.meta.get("classes")
    num_classes = config.model.num_classes or len(trained_on or Manifest.load(config.data.root).classes)
    model_config = config.model
    model_config.pretrained, model_config.finetune_from = False, None
    model = _build(model_config, num_classes, any_size)
    model.load_state_dict(evaluated_weights(state))
    return model.eval(), config, checkpoint, num_classes


def _build(config: ModelConfig, num_classes: int, any_size: bool):
    from slurmvision.models import build_model

    for switch in ANY_SIZE_KWARGS if any_size else ():
        if switch.keys() & config.kwargs.keys():  # the run chose for itself
            continue
        try:
            return build_model(replace(config, kwargs={**config.kwargs, **switch}), num_classes)
        except ConfigError:  # not a switch of this model (build_model's word for a TypeError)
            continue
    return build_model(config, num_classes)
