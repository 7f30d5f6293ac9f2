"""The SG-Former network: four stages of alternating attentions, with timm's model interface."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slurmvision.models.sgformer.attention import Attention, HybridScaleAttention, SignificanceGuidedAttention, Size
from slurmvision.models.sgformer.layers import Block, PatchMerging, Stem


def _pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: choose 'avg' (mean of the tokens) or '' (none)")
    return global_pool


class SGFormer(nn.Module):
    """SG-Former. Parameter names and shapes are the reference's (patch_embed1, block1.0.attn.q1, ...): its weights
    load as they are.

    `img_size` sets the grid the position embedding is learned on; any other input size resamples it.
    """

    def __init__(
        self,
        img_size: int | Size = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        depths: tuple[int, ...] = (2, 4, 16, 1),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(num_heads) == len(depths) == len(sr_ratios) == 4:
            raise ValueError("give four stages of embed_dims, num_heads, depths and sr_ratios")
        for dim, heads, depth, sr in zip(embed_dims, num_heads, depths, sr_ratios):
            if dim % heads or sr > 1 and (depth % 2 or heads % 2 or dim % (2 * heads)):
                raise ValueError(
                    f"a stage of dim {dim}, {heads} heads, depth {depth} and sr {sr} does not fit: "
                    "heads must divide dim, and stages with sr > 1 need even depths and head counts"
                )
        self.num_classes, self.global_pool = num_classes, _pool(global_pool)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        rows, cols = to_2tuple(img_size)
        self.grid: Size = (-(-rows // 4), -(-cols // 4))  # the stem's stride-4 grid

        self.patch_embed1 = Stem(in_chans, embed_dims[0])
        self.pos_embed = nn.Parameter(build_sincos2d_pos_embed(list(self.grid), dim=embed_dims[0]).unsqueeze(0))
        rates = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]  # rising with depth
        for i, (dim, heads, depth, sr) in enumerate(zip(embed_dims, num_heads, depths, sr_ratios), 1):
            if i > 1:
                setattr(self, f"patch_embed{i}", PatchMerging(embed_dims[i - 2], dim))
            kinds = [Attention] if sr == 1 else [HybridScaleAttention, SignificanceGuidedAttention]
            setattr(
                self,
                f"block{i}",
                nn.ModuleList(
                    Block(dim, heads, sr, kinds[j % len(kinds)], mlp_ratio, qkv_bias, rates[sum(depths[: i - 1]) + j])
                    for j in range(depth)
                ),
            )
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, SignificanceGuidedAttention):
                # Each merge starts as the mean of its chunk (a generic init would make the keys near zero).
                for i in range(1, len(module.shares) + 1):
                    merge: nn.Linear = getattr(module, f"f{i}")
                    nn.init.constant_(merge.weight, 1 / merge.in_features)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        stages = r"^(?:patch_embed|block|norm)(\d+)"
        fine = [(r"^patch_embed(\d+)", (0,)), (r"^block(\d+)\.(\d+)", None), (r"^norm(\d+)", (99999,))]
        return {"stem": r"^patch_embed1\.|^pos_embed", "blocks": stages if coarse else fine}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's normed tokens as a map, (B, H/32, W/32, C) like timm's Swin (Grad-CAM reads it)."""
        x, size = self.patch_embed1(x)
        pos = self.pos_embed
        if size != self.grid:
            pos = resample_abs_pos_embed(pos, list(size), list(self.grid), num_prefix_tokens=0, interpolation="bicubic")
        x = x + pos
        for i in range(1, 5):
            if i > 1:
                x, size = getattr(self, f"patch_embed{i}")(x, size)
            significance = None
            for block in getattr(self, f"block{i}"):
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x, significance = checkpoint(block, x, size, significance, use_reentrant=False)
                else:
                    x, significance = block(x, size, significance)
            x = getattr(self, f"norm{i}")(x)
        return x.unflatten(1, size)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
