"""Drop-in for official SAM: `Predictor.from_torch` gives the same answers as `segment_anything.SamPredictor`.

The reference is official code end to end: `sam_model_registry`-style `Sam` built from the official modules
(a vit_b with the encoder shrunk to 2 blocks of width 64 for CPU speed), loaded strictly with our weights,
and `SamPredictor.set_image` / `predict` — Pillow resize to uint8, normalise, pad with 0 after normalising.
Random weights amplify any input difference (1/255 on the input gave 0.16 on the low-res logits before).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medico_peft.models.build import build_from_spec
from medico_peft.models.specs import get_spec
from medico_peft.runtime import Predictor
from medico_peft.runtime.preprocess import pil_resize_uint8_graph, preprocess_image

TOL = 1e-4


def small_vit_b_spec(img_size: int = 1024):
    spec = get_spec("vit_b")
    enc = dict(spec.encoder, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1])
    return dataclasses.replace(spec, encoder=enc).with_img_size(img_size)


def official_sam(spec, state: dict):
    """An official `Sam` (as `sam_model_registry` builds it) with this encoder size, loaded strictly."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    e = spec.encoder
    emb = spec.img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=e["depth"], embed_dim=e["embed_dim"], img_size=spec.img_size,
                                      mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      num_heads=e["num_heads"], patch_size=16, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=tuple(e["global_attn_indexes"]), window_size=14,
                                      out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(emb, emb),
                                     input_image_size=(spec.img_size, spec.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    sam.load_state_dict(state, strict=True)
    return sam.eval()


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint8 photo-like image: smooth colour fields plus noise (both matter for resize rounding)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    img = 127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    spec = small_vit_b_spec()
    ours = build_from_spec(spec).eval()
    with torch.no_grad():  # non-trivial decoder weights, so prompts matter
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from segment_anything import SamPredictor

    return ours, SamPredictor(official_sam(spec, ours.state_dict()))


PROMPTS = {
    "box": dict(box=[150.0, 100.0, 420.0, 380.0]),
    "points": dict(points=[[300.0, 200.0], [100.0, 400.0]], labels=[1, 0]),
    "box+point": dict(box=[150.0, 100.0, 420.0, 380.0], points=[[300.0, 220.0]], labels=[1]),
}


def _official(pred, prompt: dict, multimask: bool):
    kw = {}
    if "points" in prompt:
        kw["point_coords"], kw["point_labels"] = np.asarray(prompt["points"]), np.asarray(prompt["labels"])
    if "box" in prompt:
        kw["box"] = np.asarray(prompt["box"])
    return pred.predict(multimask_output=multimask, return_logits=True, **kw)


@pytest.mark.parametrize("hw", [(480, 640), (2000, 3000)], ids=["480x640-upscale", "2000x3000-downscale"])
def test_same_input_tensor_as_sampredictor(pair, hw):
    """The encoder input (normalised, padded) equals the official one, upscale and downscale."""
    ours, official = pair
    img = smooth_image(*hw)
    official.set_image(img)
    x = preprocess_image(torch.from_numpy(img), ours.img_size, "div255", pad_value=ours.pixel_mean.reshape(-1))
    ref = official.model.preprocess(torch.as_tensor(official.transform.apply_image(img)).permute(2, 0, 1)[None]
                                    .float())
    assert (ours.normalize(x) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("prompt", list(PROMPTS), ids=list(PROMPTS))
@pytest.mark.parametrize("multimask", [False, True])
def test_predictor_equals_official_sampredictor(pair, prompt, multimask):
    """Non-square 480×640 uint8 image: low-res logits, full-size logits, masks and scores ≤ 1e-4."""
    ours, official = pair
    img = smooth_image(480, 640)
    official.set_image(img)
    masks_ref, scores_ref, low_ref = _official(official, PROMPTS[prompt], multimask)
    p = Predictor.from_torch(ours, click_radius=0).set_image(img).predict(multimask=multimask, **PROMPTS[prompt])
    assert p.low_res_logits.shape == low_ref.shape
    assert np.abs(p.low_res_logits - low_ref).max() <= TOL
    assert np.abs(p.logits - masks_ref).max() <= TOL
    assert np.abs(p.scores - scores_ref).max() <= TOL
    ref_masks = masks_ref > official.model.mask_threshold
    decided = np.abs(masks_ref) > TOL  # a pixel whose logit is within 1e-4 of 0 may fall either side
    assert np.array_equal(p.masks[decided], ref_masks[decided])
    assert (p.masks != ref_masks).mean() < 1e-4
    assert p.masks.any() and not p.masks.all()  # a real mask, not a trivially equal empty/full one


@pytest.mark.parametrize("hw", [(480, 640), (33, 97), (600, 1024), (7, 5)])
def test_graph_resize_equals_pillow_where_pillow_runs_horizontal_first(hw):
    """The traceable fixed-point resize equals Pillow exactly (upscales: Pillow's horizontal-first order)."""
    img = smooth_image(*hw, seed=3)
    oh, ow = (round(hw[0] * 1024 / max(hw)), round(hw[1] * 1024 / max(hw)))
    ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
    got = pil_resize_uint8_graph(torch.from_numpy(img), torch.tensor(oh), torch.tensor(ow))
    assert np.array_equal(got.permute(1, 2, 0).numpy().astype(np.uint8), ref)


def test_graph_resize_downscale_differs_from_pillow_by_at_most_one_level():
    """Where Pillow 13 picks the vertical pass first (1500×700 → 1024×478), the graph's order costs ≤ 1 level."""
    img = smooth_image(1500, 700, seed=4)
    ref = np.asarray(Image.fromarray(img).resize((478, 1024), Image.BILINEAR)).astype(int)
    got = pil_resize_uint8_graph(torch.from_numpy(img), torch.tensor(1024), torch.tensor(478))
    diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - ref)
    assert diff.max() <= 1


@pytest.mark.slow
def test_onnx_in_graph_preprocessing_equals_sampredictor(pair, tmp_path):
    """The exported encoder with in-graph preprocessing (uint8 input) gives SamPredictor's embeddings (≤ 1e-4),
    and the ONNX predictor its low-res logits."""
    pytest.importorskip("onnxruntime")
    from medico_peft.export.onnx_export import export_onnx

    ours, official = pair
    img = smooth_image(480, 640)
    official.set_image(img)
    export_onnx(ours, tmp_path / "onnx", with_preprocess=True, input_dtype="uint8", simplify=False)
    pred = Predictor.from_onnx(tmp_path / "onnx", threads=1, click_radius=0).set_image(img)
    assert (pred._embeddings.float() - official.features).abs().max().item() <= TOL
    _, _, low_ref = _official(official, PROMPTS["box"], False)
    assert np.abs(pred.predict(**PROMPTS["box"]).low_res_logits - low_ref).max() <= TOL
