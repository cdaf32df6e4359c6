"""Build a `MedSam` from a `ModelSpec` (random weights) — loading lives in `checkpoints.py`."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .mask_decoding import use_sdpa_decoder_attention
from .sam import MedSam
from .specs import ModelSpec, get_spec


def _vit_encoder(spec: ModelSpec) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    from .vit_attention import use_sdpa_attention

    e = spec.encoder
    encoder = ImageEncoderViT(
        img_size=spec.img_size, patch_size=e["patch_size"], embed_dim=e["embed_dim"], depth=e["depth"],
        num_heads=e["num_heads"], mlp_ratio=e["mlp_ratio"], out_chans=spec.prompt_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=True,
        window_size=e["window_size"], global_attn_indexes=tuple(e["global_attn_indexes"]),
    )
    use_sdpa_attention(encoder)  # same parameters and outputs, no N×N attention map (models/vit_attention.py)
    return encoder


def _tinyvit_encoder(spec: ModelSpec) -> nn.Module:
    from .tiny_vit import TinyViT

    e = spec.encoder
    return TinyViT(img_size=spec.img_size, embed_dims=e["embed_dims"], depths=e["depths"],
                   num_heads=e["num_heads"], window_sizes=e["window_sizes"], mlp_ratio=e["mlp_ratio"],
                   mbconv_expand_ratio=e["mbconv_expand_ratio"], local_conv_size=e["local_conv_size"],
                   out_chans=spec.prompt_dim)


def build_from_spec(spec: ModelSpec) -> MedSam:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    encoder = _vit_encoder(spec) if spec.family == "vit" else _tinyvit_encoder(spec)
    e = spec.embedding_size
    prompt_encoder = PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(e, e),
                                   input_image_size=(spec.img_size, spec.img_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                                      num_heads=spec.decoder_heads),
        transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.iou_hidden_dim,
    )
    use_sdpa_decoder_attention(mask_decoder)  # same parameters and outputs (models/mask_decoding.py)
    return MedSam(spec, encoder, prompt_encoder, mask_decoder)


def build_model(name: str, img_size: int | None = None, seed: int | None = None) -> MedSam:
    """Random-weight model by name (`vit_b`, `vit_l`, `vit_h`, `vit_tiny`, `litemedsam`)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = build_from_spec(get_spec(name, img_size))
    model.eval()
    return model
