"""TinyViT image encoder as used by LiteMedSAM (256² input, 1×1 patch embedding, 64×64×256 output).

Written for this library rather than vendored, with two deliberate differences from the
original implementation, both output-identical:
- the attention bias table is gathered on every forward instead of being cached on `eval()`,
  so loading weights after `eval()` can no longer leave a stale bias behind;
- no dependency on timm.
State-dict keys match the published LiteMedSAM checkpoint exactly.

Its fused `qkv` output is *interleaved per head*: for each head, `key_dim` query features, then
`key_dim` key features, then `d` value features (see `Attention.qkv_layout`). Anything that adapts
q, k or v separately must use that layout, not contiguous thirds.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling.common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys `c.*`, `bn.*`)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1×1 expand, 3×3 depthwise, 1×1 project)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, ks=3, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x):
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """Downsampling between stages; takes (B, C, H, W) or tokens (B, H*W, C), returns tokens."""

    def __init__(self, resolution: tuple, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, ks=3, stride=stride, pad=1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _offset_index(window: int) -> tuple[torch.Tensor, int]:
    """Index of the learned bias for every pair of positions, by their absolute (dy, dx) offset."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple, int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class Attention(nn.Module):
    """Windowed multi-head attention with a learned relative-offset bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.d = self.key_dim  # attn_ratio 1 in LiteMedSAM
        self.scale = self.key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * self.key_dim + self.d))
        self.proj = nn.Linear(num_heads * self.d, dim)
        idx, n_offsets = _offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    @property
    def qkv_layout(self) -> dict:
        """Where q, k and v live in the fused output: per head, [q(key_dim) | k(key_dim) | v(d)]."""
        return {"kind": "interleaved", "num_heads": self.num_heads, "sizes": (self.key_dim, self.key_dim, self.d)}

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple, num_heads: int, window: int, mlp_ratio: float,
                 local_conv_size: int):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, ks=local_conv_size, pad=local_conv_size // 2, groups=dim)

    def _windowed_attention(self, x):
        h, w = self.resolution
        b, n, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w].contiguous()
        return x.view(b, n, c)

    def forward(self, x):
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(ConvStage):
    def __init__(self, dim: int, resolution: tuple, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 local_conv_size: int, downsample: nn.Module | None):
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList([
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)
        ])
        self.downsample = downsample


class TinyViT(nn.Module):
    """TinyViT encoder producing SAM-compatible (B, 256, img/4, img/4) embeddings."""

    def __init__(self, img_size: int = 256, in_chans: int = 3, embed_dims=(64, 128, 160, 320),
                 depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3, out_chans: int = 256):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # Stage resolutions: full, /2, /4, and the last merge keeps /4 (stride 1).
        res = [img_size, img_size // 2, img_size // 4, img_size // 4]
        self.out_res = res[-1]
        self.layers = nn.ModuleList()
        n = len(depths)
        for i in range(n):
            down = None
            if i < n - 1:
                stride = 1 if i == n - 2 else 2
                down = PatchMerging((res[i], res[i]), embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                stage = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, down)
            else:
                stage = AttentionStage(embed_dims[i], (res[i], res[i]), depths[i], num_heads[i], window_sizes[i],
                                       mlp_ratio, local_conv_size, down)
            self.layers.append(stage)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_res, self.out_res, c).permute(0, 3, 1, 2)
        return self.neck(x)
