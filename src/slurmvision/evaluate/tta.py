"""Test-time augmentation: average the class probabilities over simple views of each image."""

from __future__ import annotations

import math

import torch

TTA_MODES = ("none", "hflip")


def predict(model: torch.nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Class scores for a normalised N x C x H x W batch, to rank with argmax or top-k.

    "none" returns the model's logits; "hflip" returns the log of the mean of the softmax
    probabilities of each image and its mirror image. The caller puts the model in eval mode.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
    with torch.inference_mode():
        logits = model(images)
        if tta == "none":
            return logits
        mirrored = model(images.flip(dims=[-1]))
        views = torch.stack([logits.float().log_softmax(dim=1), mirrored.float().log_softmax(dim=1)])
        # log(mean(p)) through logsumexp: a probability that underflows to 0 would otherwise give -inf.
        return views.logsumexp(dim=0) - math.log(len(views))
