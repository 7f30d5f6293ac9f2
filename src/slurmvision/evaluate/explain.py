"""Grad-CAM pictures (pytorch-grad-cam): where a model looked for its top class, beside the image, with its
top-3 classes and their probabilities. `slurmvision explain` draws them for image files; the trainer can log
`gradcam_pictures` of a fixed set of val images at each evaluation."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from slurmvision.errors import DataError, SlurmVisionError

TOP = 3
MIN_SIDE = 224  # small images are enlarged (nearest) to at least this side, so their pixels and the text show
CHUNK = 16  # images per Grad-CAM pass: the backward pass keeps a batch's activations


class _Tapped(torch.nn.Module):
    """The model with an identity layer between `forward_features` and `forward_head`: Grad-CAM's target, the last
    feature map, found the same way in any timm model (Swin V2, SG-Former, ViTs, convnets)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.tap = model, torch.nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.tap(self.model.forward_features(images)))


def feature_map(
    features: torch.Tensor,
    image_hw: tuple[int, int],
    channels: int,
    layout: Optional[str] = None,
    prefix_tokens: int = 0,
) -> torch.Tensor:
    """Features as the N x C x h x w map Grad-CAM weighs. Maps are NCHW or NHWC (Swin V2, SG-Former): the model's
    `layout` (timm's output_fmt) says which, or else the place of its `channels`. Tokens (N x L x C: ViTs) lose
    their `prefix_tokens` (class, register) and are laid out on the grid of the image's aspect ratio."""
    if features.ndim == 3:
        tokens = features[:, prefix_tokens:]
        height, width = image_hw
        stride = math.sqrt(height * width / tokens.shape[1])
        grid = (round(height / stride), round(width / stride))
        return tokens.reshape(len(tokens), *grid, tokens.shape[2]).permute(0, 3, 1, 2)
    channels_last = layout == "NHWC" if layout else features.shape[1] != channels
    return features.permute(0, 3, 1, 2) if channels_last else features


def require_gradcam() -> None:
    """Raise the one-line error of a missing grad-cam package (an optional dependency: slurmvision[explain])."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise SlurmVisionError(
            "Grad-CAM pictures need the grad-cam package: pip install 'slurmvision[explain]'"
        ) from None


def gradcam(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(N x H x W Grad-CAM maps in [0, 1] of each image's top-1 class, N x classes probabilities on the CPU) for a
    batch of model inputs. The model's mode, requires_grad flags and parameter gradients are as before afterwards:
    the gradient Grad-CAM needs flows from the input, so a training step's gradients are never touched."""
    require_gradcam()
    from pytorch_grad_cam import GradCAM

    inputs = inputs.detach().float().requires_grad_()
    tapped = _Tapped(model)
    image_hw = tuple(inputs.shape[-2:])
    layout, prefix = getattr(model, "output_fmt", None), getattr(model, "num_prefix_tokens", 0)
    params = list(model.parameters())
    saved, training = [(p.requires_grad, p.grad) for p in params], model.training
    cam = GradCAM(
        tapped,
        [tapped.tap],  # (puts the model in eval mode)
        reshape_transform=lambda f: feature_map(f, image_hw, model.num_features, layout, prefix),
    )
    try:
        model.requires_grad_(False)
        # float32 even inside the trainer's autocast: Grad-CAM reads activations and gradients as numpy arrays
        with torch.autocast(inputs.device.type, enabled=False):
            maps = cam(inputs, targets=None)  # no targets: each image's top-1 class
            with torch.no_grad():
                probs = model(inputs).float().softmax(1).cpu()
    finally:
        cam.activations_and_grads.release()  # its hooks (its context manager would swallow an IndexError)
        for p, (flag, grad) in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(training)
    return maps, probs


def gradcam_pictures(
    model: torch.nn.Module,
    images: torch.Tensor,
    classes: Sequence[str],
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> list[np.ndarray]:
    """One H' x W' x 3 uint8 picture per image: the image and its Grad-CAM overlay for the top-1 class side by side,
    the top-3 classes with their probabilities below.

    `images` is N x 3 x H x W uint8, as evaluation reads them (eval_batches: resized and centre-cropped);
    `normalize` turns them into the model's input (the trainer's DeviceAugment.normalize).
    """
    maps, probs = gradcam(model, normalize(images))
    return [_picture(image, heat, top) for image, heat, top in zip(images, maps, _top(probs, classes))]


def _top(probs: torch.Tensor, classes: Sequence[str]) -> list[list[tuple[str, float]]]:
    values, indices = probs.topk(min(TOP, probs.shape[1]), dim=1)
    return [[(classes[c], p) for p, c in zip(ps, cs)] for ps, cs in zip(values.tolist(), indices.tolist())]


def _picture(image: torch.Tensor, heat: np.ndarray, top: list[tuple[str, float]]) -> np.ndarray:
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = image.permute(1, 2, 0).cpu().numpy()
    overlay = show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.5)
    scale = math.ceil(MIN_SIDE / min(image.shape[:2]))
    pair = np.concatenate([image, overlay], axis=1).repeat(scale, axis=0).repeat(scale, axis=1)
    # DejaVu Sans (matplotlib's, which grad-cam brings) covers the accents of class names; Pillow's font does not.
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 15)
    line = 22
    canvas = Image.new("RGB", (pair.shape[1], pair.shape[0] + line * len(top) + 8), "white")
    canvas.paste(Image.fromarray(pair))
    draw = ImageDraw.Draw(canvas)
    for i, (name, probability) in enumerate(top):
        draw.text((6, pair.shape[0] + 4 + i * line), f"{name}  {probability:.1%}", fill="black", font=font)
    return np.asarray(canvas)


def explain_run(
    checkpoint_path: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    data_root: Optional[str] = None,
    image_size: Optional[int] = None,
) -> list[dict]:
    """`slurmvision explain`: a Grad-CAM picture per image file, written as OUT/<image name>.png; the images go
    through the checkpoint's eval transform (resize, centre crop at data.img_size or `image_size`, normalise).
    Returns [{"image", "picture", "top": [{"class", "probability"}]}]."""
    from PIL import Image

    from slurmvision.evaluate.export import set_image_size
    from slurmvision.evaluate.model import load_model
    from slurmvision.shards.manifest import Manifest
    from slurmvision.shards.reader import transform_sample
    from slurmvision.shards.transforms import DeviceAugment, eval_transform

    require_gradcam()
    paths = [Path(image) for image in images]
    for path in paths:
        if not path.is_file():
            raise DataError(f"no image file {path}")
    model, config, checkpoint, num_classes = load_model(checkpoint_path, data_root)
    size = image_size or config.data.img_size
    if image_size:
        set_image_size(model, size)
    classes = checkpoint.meta.get("classes") or Manifest.load(config.data.root).classes  # as trained
    transform = eval_transform(config.data, size)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform_sample(transform, path.read_bytes()))
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None
    normalize = DeviceAugment(config.data, num_classes, torch.device("cpu"), seed=0, rank=0).normalize
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [path.stem for path in paths]
    results = []
    for start in range(0, len(tensors), CHUNK):
        images = torch.stack(tensors[start : start + CHUNK])
        maps, probs = gradcam(model, normalize(images))
        for i, image, heat, top in zip(itertools.count(start), images, maps, _top(probs, classes)):
            picture = out / (f"{stems[i]}.png" if stems.count(stems[i]) == 1 else f"{stems[i]}-{i}.png")
            Image.fromarray(_picture(image, heat, top)).save(picture)
            results.append(
                {
                    "image": str(paths[i]),
                    "picture": str(picture),
                    "top": [{"class": name, "probability": p} for name, p in top],
                }
            )
    return results
