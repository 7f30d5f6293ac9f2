"""SG-Former's attentions: hybrid-scale (global and windowed halves, measuring significance), significance-guided
(keys merged from the tokens sorted by significance) and plain, with the token-layout helpers they share."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
