"""Automatic (prompt-free) multi-class segmentation on a SAM image encoder: `SemanticSam`.

`SemanticSam` wraps a `MedSam` (attribute `sam`, so PEFT injection into `sam.image_encoder` works
unchanged) and adds a head that predicts C class logits (class 0 = background) at the model's input
resolution, from images preprocessed exactly like the interactive path ((B, 3, S, S) in [0, 1]).

Two heads:
- `unetr` (MedicoSAM / micro-sam): a convolutional decoder on the encoder. The neck output is the
  bottom of a U; skip features are *taps* (outputs of intermediate encoder modules) brought to
  their level of the U. ViT: blocks at depth/4, depth/2 and 3·depth/4 (UNETR), reaching levels
  8E, 4E and 2E with 3, 2 and 1 transposed convolutions (E = S/16). TinyViT: the last block of
  stage 2 (S/4) joins the bottom level, the last block of stage 1 (S/2) the next one. Both add a
  convolution of the normalised image at full resolution.
- `samed` (SAMed): a copy of SAM's mask decoder run without prompts (no sparse token, the
  no-mask dense embedding) with one mask token and hypernetwork MLP per class, grown from the
  pretrained ones (class i starts from pretrained token i mod 4); its 4E logits are upsampled
  bilinearly to S. The interactive decoder in `sam.mask_decoder` is left untouched.

Taps are module names relative to `sam.image_encoder` (they equal the segment names the trainer's
`SegmentedEncoder` uses), read here with forward hooks looked up at call time, so blocks whose
attention/MLP were wrapped by PEFT are the ones observed. The interactive path is not changed.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .mask_decoding import two_way_transformer, upscaled_mask_logits
from .sam import MedSam

HEAD_KINDS = ("unetr", "samed")
BACKGROUND = "background"


# --- encoder taps --------------------------------------------------------------------------------
def tap_names(sam: MedSam) -> list[str]:
    """Encoder-relative module names whose outputs feed the UNETR skips, coarsest first."""
    enc = sam.image_encoder
    if sam.spec.family == "vit":
        depth = len(enc.blocks)
        idx = [max(0, depth * k // 4 - 1) for k in (3, 2, 1)]
        return [f"blocks.{i}" for i in idx]
    # TinyViT: stage 2 (S/4) then stage 1 (S/2), last block of each (outputs before the downsampling)
    return [f"layers.{li}.blocks.{len(enc.layers[li].blocks) - 1}" for li in (2, 1)]


def tap_to_map(t: torch.Tensor, family: str) -> torch.Tensor:
    """A tapped block output → (B, C, h, w): ViT blocks give (B, h, w, C), TinyViT blocks tokens (B, h·w, C)."""
    if family == "vit":
        return t.permute(0, 3, 1, 2)
    b, n, c = t.shape
    r = math.isqrt(n)
    return t.transpose(1, 2).reshape(b, c, r, r)


def encode_with_taps(sam: MedSam, images: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`sam.encode(images)` plus the raw outputs of the named encoder modules (forward hooks)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = sam.image_encoder.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda _m, _i, o, name=name: out.__setitem__(name, o)))
        emb = sam.encode(images)
    finally:
        for h in handles:
            h.remove()
    return emb, [out[n] for n in names]


# --- UNETR head ----------------------------------------------------------------------------------
def _norm(ch: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ConvBlock(nn.Sequential):
    """Two 3×3 conv + GroupNorm + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Sequential):
    """×2 transposed convolution, then 3×3 conv + GroupNorm + ReLU (UNETR's deconvolution block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         _norm(cout), nn.ReLU(inplace=True))


class UnetrHead(nn.Module):
    """Convolutional U-decoder: level 0 at the embedding grid E, level L at the input size S = E·2^L.

    `skips`: (level, channels, n_up) per tap, in tap order; a tap at resolution E·2^(level-n_up)
    is brought to its level by `n_up` `UpBlock`s. The normalised image joins level L.
    """

    def __init__(self, in_channels: int, skips: list[tuple[int, int, int]], channels: list[int], num_classes: int):
        super().__init__()
        levels = len(channels)
        self.skip_levels = [lvl for lvl, _, _ in skips]
        projs = []
        for lvl, ch, n_up in skips:
            if not 0 <= lvl < levels:
                raise ConfigError(f"semantic head: skip level {lvl} outside 0..{levels - 1}")
            w = channels[lvl]
            if n_up == 0:
                projs.append(nn.Sequential(nn.Conv2d(ch, w, 1, bias=False), _norm(w), nn.ReLU(inplace=True)))
            else:
                projs.append(nn.Sequential(*[UpBlock(ch if i == 0 else w, w) for i in range(n_up)]))
        self.skip_proj = nn.ModuleList(projs)
        self.image_proj = ConvBlock(3, channels[-1])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(channels[i - 1], channels[i], 2, stride=2)
                                  for i in range(1, levels)])
        fuse = []
        for lvl in range(levels):
            n_in = 1 + self.skip_levels.count(lvl) + (lvl == levels - 1)
            cin = (in_channels if lvl == 0 else channels[lvl]) + (n_in - 1) * channels[lvl]
            fuse.append(ConvBlock(cin, channels[lvl]))
        self.fuse = nn.ModuleList(fuse)
        self.out = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, embedding: torch.Tensor, skips: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        projected = [proj(s) for proj, s in zip(self.skip_proj, skips)]
        levels = len(self.fuse)
        x = embedding
        for lvl in range(levels):
            if lvl > 0:
                x = self.ups[lvl - 1](x)
            parts = [x] + [p for p, sl in zip(projected, self.skip_levels) if sl == lvl]
            if lvl == levels - 1:
                parts.append(self.image_proj(image))
            x = self.fuse[lvl](torch.cat(parts, dim=1) if len(parts) > 1 else x)
        return self.out(x)


def default_channels(sam: MedSam) -> list[int]:
    """Decoder widths per level, coarsest first: ViT 256,128,64,32,16 (S/16 → S); TinyViT 64,32,16 (S/4 → S).

    TinyViT's bottom level already sits at S/4 (64² for LiteMedSAM), where a 256-wide 3×3 block would
    cost more than the whole encoder; 64 keeps the head a small share of a training step on CPU.
    """
    levels = int(round(math.log2(sam.img_size / sam.spec.embedding_size))) + 1
    if sam.spec.family == "vit":
        return [max(16, 256 >> i) for i in range(levels)]
    return [max(16, 64 >> i) for i in range(levels)]


def build_unetr_head(sam: MedSam, num_classes: int, channels: list[int] | None = None) -> UnetrHead:
    channels = list(channels) if channels else default_channels(sam)
    levels = int(round(math.log2(sam.img_size / sam.spec.embedding_size))) + 1
    if len(channels) != levels:
        raise ConfigError(f"semantic.channels: {sam.spec.name} at {sam.img_size}² needs {levels} decoder widths "
                          f"(embedding {sam.spec.embedding_size}² up to {sam.img_size}²), got {channels}")
    e = sam.spec.encoder
    if sam.spec.family == "vit":
        dim = e["embed_dim"]
        skips = [(1, dim, 1), (2, dim, 2), (3, dim, 3)] if levels >= 4 else [(lvl, dim, lvl) for lvl in range(1, levels)]
    else:
        dims = e["embed_dims"]
        skips = [(0, dims[2], 0), (1, dims[1], 0)]
    return UnetrHead(sam.spec.prompt_dim, skips, channels, num_classes)


# --- SAMed head ----------------------------------------------------------------------------------
class SamedHead(nn.Module):
    """SAM's mask decoder without prompts, one mask token and hypernetwork MLP per class."""

    def __init__(self, sam: MedSam, num_classes: int):
        super().__init__()
        md = sam.mask_decoder
        pretrained = md.mask_tokens.weight.detach()
        self.transformer = copy.deepcopy(md.transformer)
        self.output_upscaling = copy.deepcopy(md.output_upscaling)
        self.iou_token = nn.Parameter(md.iou_token.weight.detach().clone())  # kept: the decoder attended to it
        self.class_tokens = nn.Parameter(torch.stack([pretrained[i % len(pretrained)].clone()
                                                      for i in range(num_classes)]))
        mlps = md.output_hypernetworks_mlps
        self.hypernetworks = nn.ModuleList([copy.deepcopy(mlps[i % len(mlps)]) for i in range(num_classes)])
        self.no_mask_embed = nn.Parameter(sam.prompt_encoder.no_mask_embed.weight.detach().clone())

    def forward(self, embedding: torch.Tensor, image_pe: torch.Tensor) -> torch.Tensor:
        b, c, h, w = embedding.shape
        tokens = torch.cat([self.iou_token, self.class_tokens], dim=0).unsqueeze(0).expand(b, -1, -1)
        src = embedding + self.no_mask_embed.reshape(1, -1, 1, 1)
        hs, keys = two_way_transformer(self.transformer, src, image_pe, tokens)
        hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        return upscaled_mask_logits(self.output_upscaling, keys, hyper, (h, w))


# --- the model -----------------------------------------------------------------------------------
class SemanticSam(nn.Module):
    """A `MedSam` plus a semantic head: `forward(images) -> (B, C, S, S)` class logits (class 0 = background)."""

    def __init__(self, sam: MedSam, head: nn.Module, kind: str, num_classes: int, class_names, head_options=None):
        super().__init__()
        self.sam = sam
        self.head = head
        self.kind = kind
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.head_options = dict(head_options or {})
        self.taps = tap_names(sam) if kind == "unetr" else []

    @property
    def img_size(self) -> int:
        return self.sam.img_size

    @property
    def spec(self):
        return self.sam.spec

    def train(self, mode: bool = True):
        super().train(mode)
        self.sam.train(mode)  # keeps the encoder's BatchNorm layers in eval mode
        return self

    def encode_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embedding, raw taps) of the image encoder for (B, 3, S, S) images in [0, 1]."""
        if self.taps:
            return encode_with_taps(self.sam, images, self.taps)
        return self.sam.encode(images), []

    def decode(self, embedding: torch.Tensor, taps: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C, S, S) from encoder outputs (raw taps as returned by `encode_features`)."""
        if self.kind == "unetr":
            maps = [tap_to_map(t, self.sam.spec.family) for t in taps]
            return self.head(embedding, maps, self.sam.normalize(images))
        logits = self.head(embedding, self.sam.prompt_encoder.get_dense_pe())
        s = self.img_size
        if logits.shape[-1] != s or logits.shape[-2] != s:
            logits = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb, taps = self.encode_features(images)
        return self.decode(emb, taps, images)

    def describe(self) -> dict:
        """Metadata adapter files and exports record: kind, classes, head options."""
        return {"kind": self.kind, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "head_options": dict(self.head_options)}


def build_semantic(sam: MedSam, kind: str, num_classes: int, class_names, channels: list[int] | None = None
                   ) -> SemanticSam:
    """A `SemanticSam` with a fresh head of `kind` ('unetr' | 'samed') for `num_classes` (background included).

    The SAMed head is grown from `sam`'s current mask decoder, so build it before any adapter changes
    that decoder. `channels`: UNETR decoder widths per level (default `default_channels`).
    """
    if kind not in HEAD_KINDS:
        raise ConfigError(f"semantic.head: unknown head {kind!r}; valid heads: {', '.join(HEAD_KINDS)}")
    class_names = list(class_names)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"semantic: num_classes must be an integer >= 2 (background + at least one class), "
                          f"got {num_classes!r}")
    if len(class_names) != num_classes:
        raise ConfigError(f"semantic: {len(class_names)} class names for {num_classes} classes "
                          f"(class 0 is the background)")
    options = {}
    if kind == "unetr":
        head = build_unetr_head(sam, num_classes, channels)
        options["channels"] = [blk[0].out_channels for blk in head.fuse]
    else:
        if channels:
            raise ConfigError("semantic.channels: only the unetr head has decoder widths")
        head = SamedHead(sam, num_classes)
    ref = next(sam.parameters())
    head.to(device=ref.device, dtype=ref.dtype)
    return SemanticSam(sam, head, kind, num_classes, class_names, options)
