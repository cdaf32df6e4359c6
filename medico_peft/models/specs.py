"""Named model configurations: the SAM ViT family, a tiny test model and LiteMedSAM.

A `ModelSpec` is everything needed to build the architecture (no weights). Specs are plain
data so they can be written into adapter and export metadata and compared on load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError

# SAM was trained on 0..255 RGB normalised with ImageNet statistics; we feed every model
# images in [0, 1], so the statistics are stored on that scale.
SAM_PIXEL_MEAN = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
SAM_PIXEL_STD = (58.395 / 255.0, 57.12 / 255.0, 57.375 / 255.0)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "vit" (segment_anything ImageEncoderViT) or "tinyvit" (LiteMedSAM)
    img_size: int
    encoder: dict = field(default_factory=dict)
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256
    pixel_mean: tuple = SAM_PIXEL_MEAN
    pixel_std: tuple = SAM_PIXEL_STD

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for SAM at 1024 and for LiteMedSAM at 256)."""
        if self.family == "vit":
            return self.img_size // self.encoder["patch_size"]
        return self.img_size // 4

    def with_img_size(self, img_size: int) -> "ModelSpec":
        if self.family != "vit":
            raise ConfigError(f"img_size: {self.name} has a fixed input size of {self.img_size}, got {img_size}")
        patch = self.encoder["patch_size"]
        if img_size <= 0 or img_size % patch:
            raise ConfigError(f"img_size: must be a positive multiple of the patch size {patch}, got {img_size}")
        return dataclasses.replace(self, img_size=img_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        for key in ("pixel_mean", "pixel_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _vit(name: str, embed_dim: int, depth: int, heads: int, global_idx: tuple, img_size: int = 1024,
         window: int = 14, **kw) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="vit",
        img_size=img_size,
        encoder=dict(embed_dim=embed_dim, depth=depth, num_heads=heads, global_attn_indexes=list(global_idx),
                     window_size=window, patch_size=16, mlp_ratio=4.0),
        **kw,
    )


SPECS: dict[str, ModelSpec] = {
    "vit_b": _vit("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # A few-hundred-thousand-parameter ViT with SAM's exact structure, for fast CPU tests.
    "vit_tiny": _vit("vit_tiny", 64, 4, 2, (1, 3), img_size=128, window=4,
                     prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2, iou_hidden_dim=32),
    "litemedsam": ModelSpec(
        name="litemedsam",
        family="tinyvit",
        img_size=256,
        encoder=dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                     window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, mbconv_expand_ratio=4.0, local_conv_size=3),
        # LiteMedSAM was trained on min-max normalised [0, 1] images without mean/std.
        pixel_mean=(0.0, 0.0, 0.0),
        pixel_std=(1.0, 1.0, 1.0),
    ),
}


def get_spec(name: str, img_size: int | None = None) -> ModelSpec:
    if name not in SPECS:
        raise ConfigError(f"model: unknown model {name!r}; valid names: {', '.join(SPECS)}")
    spec = SPECS[name]
    if img_size is not None and img_size != spec.img_size:
        spec = spec.with_img_size(img_size)
    return spec
