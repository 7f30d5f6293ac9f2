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
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, build_sincos2d_pos_embed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SGFormer"]

Size = tuple[int, int]
WINDOW = 7
# Significance-guided merging per sr: (r, share of the sorted tokens in quarters) for f1, f2, f3, least
# significant first. These are the reference's fixed values; at 224 px every group is a whole number of chunks.
MERGES: dict[int, tuple[tuple[int, int], ...]] = {
    8: ((196, 1), (56, 2), (28, 1)),
    4: ((49, 1), (14, 2), (7, 1)),
    2: ((2, 2), (1, 2)),
}


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    return x.transpose(1, 2).flatten(2)


def _grid(x: Tensor, size: Size) -> Tensor:
    """Tokens (B, H*W, C) -> map (B, C, H, W)."""
    return x.transpose(1, 2).unflatten(2, size)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns its probabilities, which the significance map is read from."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if key_mask is not None:
        attn = attn.masked_fill(~key_mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    return attn @ v, attn


def _windows(x: Tensor, size: Size, window: Size) -> Tensor:
    """(B, H*W, C) -> (B * windows, wh * ww, C), zero-padded at the bottom and right to whole windows."""
    (H, W), (wh, ww) = size, window
    x = F.pad(x.unflatten(1, size), (0, 0, 0, -W % ww, 0, -H % wh))
    x = x.unflatten(2, (-1, ww)).unflatten(1, (-1, wh)).transpose(2, 3)  # B, rows, cols, wh, ww, C
    return x.flatten(0, 2).flatten(1, 2)


def _unwindows(x: Tensor, batch: int, size: Size, window: Size) -> Tensor:
    """Inverse of `_windows`, dropping the padding."""
    (H, W), (wh, ww) = size, window
    # (n + d - 1) // d, not -(-n // d): traced to ONNX, // divides rounding toward zero
    x = x.unflatten(1, window).unflatten(0, (batch, (H + wh - 1) // wh, (W + ww - 1) // ww)).transpose(2, 3)
    return x.flatten(1, 2).flatten(2, 3)[:, :H, :W].flatten(1, 2)


class _Attention(nn.Module):
    """What every SG-Former attention shares: a locally-enhanced positional term (depth-wise 3x3 conv of a
    projection of the input) added before the output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.lepe_linear = nn.Linear(dim, dim)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def project(self, out: Tensor, x: Tensor, size: Size) -> Tensor:
        lepe = self.lepe_conv(_grid(self.lepe_linear(x), size)).flatten(2).transpose(1, 2)
        return self.proj(out + lepe)


class HybridScaleAttention(_Attention):
    """Half the heads attend globally (keys from a stride-sr conv of the map), half within 7x7 windows. Returns
    the significance of each token, from the detached attention: what the reduced key covering it receives
    (mean over heads and queries) plus what it receives within its window."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool) -> None:
        super().__init__(dim, num_heads)
        self.sr_ratio = sr_ratio
        self.q1 = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.q2 = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: Tensor, size: Size, significance: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        wide, wide_significance = self._global(x, size)
        local, local_significance = self._local(x, size)
        return self.project(torch.cat([wide, local], dim=-1), x, size), wide_significance + local_significance

    def _global(self, x: Tensor, size: Size) -> tuple[Tensor, Tensor]:
        (H, W), s, heads = size, self.sr_ratio, self.num_heads // 2
        reduced = self.sr(F.pad(_grid(x, size), (0, -W % s, 0, -H % s)))
        rows, cols = reduced.shape[-2:]
        k, v = _heads(self.kv1(self.act(self.norm(reduced.flatten(2).transpose(1, 2)))), 2 * heads).chunk(2, dim=1)
        out, attn = _attend(_heads(self.q1(x), heads), k, v, self.scale)
        received = attn.detach().mean(dim=(1, 2)).view(-1, rows, cols)
        significance = received.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, :H, :W].flatten(1)
        return _merge_heads(out), significance

    def _local(self, x: Tensor, size: Size) -> tuple[Tensor, Tensor]:
        heads, batch = self.num_heads // 2, x.shape[0]
        window = (min(WINDOW, size[0]), min(WINDOW, size[1]))  # one window covers a smaller map
        q = _heads(_windows(self.q2(x), size, window), heads)
        k, v = _heads(_windows(self.kv2(x), size, window), 2 * heads).chunk(2, dim=1)
        real = _windows(x.new_ones(batch, x.shape[1], 1), size, window)  # 1 at real tokens, 0 at padding
        out, attn = _attend(q, k, v, self.scale, key_mask=real.transpose(1, 2).unsqueeze(1).bool())
        # Attention each key receives, averaged over heads and over the real queries of its window.
        received = (attn.detach().mean(dim=1) * (real / real.sum(dim=1, keepdim=True))).sum(dim=1)
        significance = _unwindows(received.unsqueeze(-1), batch, size, window).squeeze(-1)
        return _unwindows(_merge_heads(out), batch, size, window), significance


class SignificanceGuidedAttention(_Attention):
    """Keys and values from the tokens sorted by significance (least first) and merged by learned Linear(r, 1)
    layers f1, f2, f3 over chunks of r consecutive sorted tokens. As in the reference, half the heads take kv1 of
    the tokens sorted from a row-major scan and half kv2 of a column-major scan: the two differ in how ties fall,
    and ties keep their scan order (a stable sort), so the result is deterministic."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool) -> None:
        super().__init__(dim, num_heads)
        if sr_ratio not in MERGES:
            raise ValueError(f"significance-guided attention has merges for sr {sorted(MERGES)}, not {sr_ratio}")
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
        self.shares = tuple(share for _, share in MERGES[sr_ratio])
        for i, (width, _) in enumerate(MERGES[sr_ratio], 1):
            setattr(self, f"f{i}", nn.Linear(width, 1))

    def forward(self, x: Tensor, size: Size, significance: Optional[Tensor]) -> tuple[Tensor, None]:
        if significance is None:
            raise ValueError("a significance-guided block must follow a hybrid-scale block")
        by_rows = significance.argsort(dim=1, stable=True)
        columns = torch.arange(x.shape[1], device=x.device).view(size).t().flatten()  # column-major scan
        by_columns = columns[significance[:, columns].argsort(dim=1, stable=True)]
        heads = self.num_heads // 2
        q1, q2 = _heads(self.q(x), self.num_heads).chunk(2, dim=1)
        k1, v1 = _heads(self.kv1(self._merge(x, by_rows)), 2 * heads).chunk(2, dim=1)
        k2, v2 = _heads(self.kv2(self._merge(x, by_columns)), 2 * heads).chunk(2, dim=1)
        out = torch.cat([_attend(q1, k1, v1, self.scale)[0], _attend(q2, k2, v2, self.scale)[0]], dim=1)
        return self.project(_merge_heads(out), x, size), None

    def _merge(self, x: Tensor, order: Tensor) -> Tensor:
        """Cut the tokens, in this order, into groups by their shares (in quarters); merge each chunk of r tokens."""
        tokens = x.gather(1, order.unsqueeze(-1).expand_as(x))
        n, parts, start, taken = tokens.shape[1], [], 0, 0
        for i, share in enumerate(self.shares, 1):
            taken += share
            end = n * taken // 4
            merge: nn.Linear = getattr(self, f"f{i}")
            chunks = (end - start + merge.in_features - 1) // merge.in_features
            if chunks:
                group = F.pad(tokens[:, start:end], (0, 0, 0, chunks * merge.in_features - (end - start)))
                parts.append(merge(group.unflatten(1, (chunks, -1)).transpose(2, 3)).squeeze(-1))
            start = end
        return torch.cat(parts, dim=1)


class Attention(_Attention):
    """Plain multi-head self-attention (stage 4, sr 1)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool) -> None:
        super().__init__(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, x: Tensor, size: Size, significance: Optional[Tensor]) -> tuple[Tensor, None]:
        k, v = _heads(self.kv(x), 2 * self.num_heads).chunk(2, dim=1)
        out, _ = _attend(_heads(self.q(x), self.num_heads), k, v, self.scale)
        return self.project(_merge_heads(out), x, size), None


class DWConv(nn.Module):
    """Depth-wise 3x3 conv over the token map (a module of its own for the reference's name mlp.dwconv.dwconv)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        return self.dwconv(_grid(x, size)).flatten(2).transpose(1, 2)


class ConvMlp(nn.Module):
    """fc1 -> GELU(x + depth-wise 3x3 conv(x)) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        x = self.fc1(x)
        return self.fc2(self.act(x + self.dwconv(x, size)))


class Block(nn.Module):
    """Pre-norm attention and MLP; passes on the significance map its attention returns (hybrid-scale only)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        attention: type[_Attention],
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attention(dim, num_heads, sr_ratio, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, size: Size, significance: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        out, significance = self.attn(self.norm1(x), size, significance)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x), size)), significance


class ConvNorm(nn.Sequential):
    """Conv without bias, then GroupNorm(1); the slots are named c and bn as in the reference's weights."""

    def __init__(self, dim: int, out_dim: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(dim, out_dim, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.GroupNorm(1, out_dim))


class Stem(nn.Module):
    """Three 3x3 convs (stride 2, 1, 2) with GroupNorm, to tokens at stride 4."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            ConvNorm(in_chans, dim, 3, 2), nn.GELU(), ConvNorm(dim, dim, 3), nn.GELU(), ConvNorm(dim, dim, 3, 2)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Size]:
        x = self.conv(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class PatchMerging(nn.Module):
    """Halves the resolution between stages: 1x1 conv, depth-wise 3x3 stride-2 conv, 1x1 conv, each normed."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, 2, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(_grid(x, size))))))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


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
