"""The modules around SG-Former's attentions: the transformer block with its convolutional MLP, the stem and the
patch merging between stages."""

from __future__ import annotations

from typing import Optional

from timm.layers import DropPath
from torch import Tensor, nn

from slurmvision.models.sgformer.attention import Size, _Attention, _grid


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
