"""Test-time augmentation: average the class probabilities over simple views of each image."""

from __future__ import annotations

import torch

TTA_MODES = ("none", "hflip")


def predict(model: torch.nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits (or log of averaged probabilities with TTA) for a normalised batch."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
    with torch.inference_mode():
        logits = model(images)
        if tta == "none":
            return logits
        probabilities = (logits.float().softmax(dim=1) + model(images.flip(dims=[3])).float().softmax(dim=1)) / 2
        return probabilities.log()
