"""SG-Former (Ren et al., "SG-Former: Self-guided Transformer with Evolving Token Reallocation", ICCV 2023,
arXiv 2308.12216) as timm models that run one set of weights at any input size.

Stages 1-3 alternate two attentions. A hybrid-scale block gives half its heads keys from a stride-sr reduction of
the whole map and half keys from their 7x7 window, and measures each token's significance: the attention it
receives. The next, significance-guided block sorts the tokens by it and merges them into keys with learned
Linear(r, 1) layers, least significant tokens in the widest chunks, so salient regions keep a finer grain.

The reference runs at 224 px only (fixed windows, group sizes and position grid). Ours generalises it so that
at 224 px nothing changes:
- windows are zero-padded to whole windows and padded keys are masked (a window always holds a real token);
  the local significance averages over the real queries of a window;
- the sorted tokens are cut into groups by the reference's fractions (1/4, 1/2, 1/4, or halves at sr 2) and each
  group into chunks of the reference's width r (the weight shape of f1/f2/f3); a group whose size is no multiple
  of r ends in a zero-padded chunk, whose merge sums only the tokens it holds;
- the stride-sr reduction pads the map to a multiple of sr (only needed for sides that are no multiple of 32);
- the position embedding, learned on the stride-4 grid of `img_size`, is resampled bicubically to other grids.

The package: `attention` holds the attentions, `layers` the block, stem and patch merging, `model` the network.
This module registers the variants with timm, which names their module after it ("sgformer").
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from slurmvision.models.sgformer.model import SGFormer

__all__ = ["SGFormer"]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0.c",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "sgformer_pico": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
        "sgformer_s": _cfg(),
        "sgformer_m": _cfg(),
        "sgformer_b": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SGFormer:
    return build_model_with_cfg(SGFormer, variant, pretrained, **kwargs)


@register_model
def sgformer_pico(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    """A small variant for tests and demos at 32 px (8x8 tokens in stage 1)."""
    args = dict(img_size=32, embed_dims=(32, 64, 96, 128), num_heads=(2, 2, 4, 4), depths=(2, 2, 2, 1))
    return _create("sgformer_pico", pretrained, **{**args, **kwargs})


@register_model
def sgformer_s(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    args = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 4, 16, 1))
    return _create("sgformer_s", pretrained, **{**args, **kwargs})


@register_model
def sgformer_m(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    args = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 6, 28, 2))
    return _create("sgformer_m", pretrained, **{**args, **kwargs})


@register_model
def sgformer_b(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    args = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 24), depths=(4, 6, 24, 2))
    return _create("sgformer_b", pretrained, **{**args, **kwargs})
