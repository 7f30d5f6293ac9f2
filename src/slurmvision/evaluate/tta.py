"""Test-time augmentation: average the class probabilities over simple views of each image.

torch is imported where it is used: the CLI's parser reads TTA_MODES on the login node."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

from slurmvision.configs import DataConfig
from slurmvision.errors import ConfigError

if TYPE_CHECKING:
    import torch

TTA_MODES = ("none", "hflip", "multiscale", "multiscale-hflip")
SCALE_STEP = 32  # the default scales: the eval size and one step either side


def predict(model: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor], tta: str = "none") -> torch.Tensor:
    """Class scores for a normalised N x C x H x W batch, to rank with argmax or top-k.

    `images` is one batch, or for the multiscale modes the same batch read at each scale (see
    `tta_scales`). The views are those images, and with "hflip" and "multiscale-hflip" their mirror
    images too. One view gives the model's logits; several give the log of the mean of their
    softmax probabilities. The caller puts the model in eval mode.
    """
    import torch

    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    with torch.inference_mode():
        views = [model(batch) for batch in batches]
        if tta.endswith("hflip"):
            views += [model(batch.flip(dims=[-1])) for batch in batches]
        if len(views) == 1:
            return views[0]
        log_probs = torch.stack([view.float().log_softmax(dim=1) for view in views])
        # log(mean(p)) through logsumexp: a probability that underflows to 0 would otherwise give -inf.
        return log_probs.logsumexp(dim=0) - math.log(len(views))


def tta_scales(tta: str, scales: Optional[Sequence[int]], data: DataConfig) -> list[int]:
    """The image sizes a mode reads the data at: the eval size, or for the multiscale modes `scales`,
    by default the sizes the run trained at (data.scales) or else the eval size and +/- 32."""
    if tta not in TTA_MODES:
        raise ConfigError(f"--tta {tta}: choose one of {', '.join(TTA_MODES)}")
    if not tta.startswith("multiscale"):
        if scales:
            raise ConfigError(f"--scales applies to --tta multiscale or multiscale-hflip, not --tta {tta}")
        return [data.img_size]
    size = data.img_size
    chosen = list(scales or data.scales or [s for s in (size - SCALE_STEP, size, size + SCALE_STEP) if s > 0])
    if not all(s >= 8 for s in chosen) or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--scales {','.join(map(str, chosen))}: give distinct image sizes of at least 8 pixels")
    return chosen


def check_scales(model: torch.nn.Module, scales: Sequence[int], device: torch.device) -> None:
    """Run the model (in eval mode) once on a blank image of each size, so that a model fixed to one input
    size fails here, before the data is read. (evaluate.model.load_model(any_size=True) builds timm's Swin
    and ViT models so that they take any size.)"""
    import torch

    for size in scales:
        try:
            with torch.inference_mode():
                model(torch.zeros(1, 3, size, size, device=device))
        except (AssertionError, RuntimeError, ValueError) as err:  # what timm's and torch's shape checks raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"the model cannot run on {size}x{size} images ({first}): choose --scales it takes, or --tta hflip"
            ) from None
