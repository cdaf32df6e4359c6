"""Training feeds the ViT encoder the padding inference feeds it (0 after normalising), without a shard change.

Shards pad the resized uint8 slice with 0 and the loader gives [0, 1] images, so before this fix a padded ViT
item reached the encoder with padding -mean/std, while the Predictor (and official SAM) pads with 0 after
normalising. `MedSam.normalize(images, input_size)` now zeroes each item's padding after normalising; LiteMedSAM
(mean 0, std 1: padding already 0) is untouched bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medico_peft.data.augment import IDENTITY_LUT, apply_lut
from medico_peft.data.resize import resize_image
from medico_peft.evaluation import TorchSegmenter, run_protocol
from medico_peft.models import build_model
from medico_peft.runtime import Predictor
from medico_peft.training.interactive_step import validate_batch
from medico_peft.training.memory import SegmentedEncoder

H, W = 80, 128  # longest side = vit_tiny's 128: no resize, so shard and Predictor content are the same pixels


def _gray_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (H, W)).astype(np.uint8)


def _shard_item(gray: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader gives for this slice: the shard writer's resize (uint8, padded with 0), then the
    loader's uint8 -> [0, 1] lookup (data/dataset.py `_make_item` without augmentation)."""
    padded, (h, w) = resize_image(gray.astype(np.float32), size)
    pixels = np.zeros((size, size), np.float32)
    apply_lut(padded[:h, :w], IDENTITY_LUT, pixels[:h, :w])
    image = torch.from_numpy(pixels).expand(3, size, size).contiguous()
    return image.unsqueeze(0), torch.tensor([[h, w]])


class _Capture:
    """Records what enters the first encoder module (the normalised, padded image)."""

    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone()))

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_model("vit_tiny", seed=0).eval()


def _predictor_input(model, gray) -> torch.Tensor:
    cap = _Capture(model.image_encoder.patch_embed)
    try:
        Predictor.from_torch(model).set_image(np.repeat(gray[:, :, None], 3, axis=2))
    finally:
        cap.close()
    assert len(cap.inputs) == 1
    return cap.inputs[0]


def test_training_encoder_input_equals_predictor_input(vit):
    gray = _gray_image()
    want = _predictor_input(vit, gray)
    images, size = _shard_item(gray, vit.img_size)
    assert size.tolist() == [[H, W]]
    encoder = SegmentedEncoder(vit, frozen_prefix=True)
    cap = _Capture(vit.image_encoder.patch_embed)
    try:
        with torch.no_grad():
            encoder(images, input_size=size)
            encoder(images)  # the old path: no content size, padding normalised from 0
    finally:
        cap.close()
    padded_now, padded_before = cap.inputs
    assert torch.equal(padded_now, want), (padded_now - want).abs().max()
    assert (padded_now[..., H:, :] == 0).all() and (padded_now[..., :, W:] == 0).all()
    # what training fed before: the padding is -mean/std, not what the Predictor feeds
    assert (padded_before - want).abs().max() > 1.0


def test_validation_and_evaluation_paths_pass_the_content_size(vit):
    """The trainer's validation (validate_batch) and the evaluator (run_protocol over TorchSegmenter) encode
    exactly the Predictor's input for a padded ViT slice."""
    gray = _gray_image()
    want = _predictor_input(vit, gray)
    images, size = _shard_item(gray, vit.img_size)
    mask = torch.zeros(1, 1, vit.img_size, vit.img_size)
    mask[0, 0, 20:50, 30:90] = 1
    batch = {"image": images, "input_size": size, "masks": mask, "boxes": torch.tensor([[[30., 20., 89., 49.]]]),
             "points": torch.tensor([[[[60., 35.]]]]), "point_labels": torch.ones(1, 1, 1, dtype=torch.long),
             "object_valid": torch.ones(1, 1, dtype=torch.bool)}
    cap = _Capture(vit.image_encoder.patch_embed)
    try:
        validate_batch(vit, SegmentedEncoder(vit), batch, torch.device("cpu"), clicks=0)
        gt = mask[0].numpy()[:, :H, :W] > 0
        run_protocol(TorchSegmenter(vit), images[0], gt, (H, W), "box", n_clicks=0)
    finally:
        cap.close()
    assert len(cap.inputs) == 2
    for got in cap.inputs:
        assert torch.equal(got, want)


def test_litemedsam_encoder_input_unchanged_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("litemedsam", seed=0).eval()
    gray = _gray_image()
    images, size = _shard_item(gray, model.img_size)
    h, w = size[0].tolist()
    assert h < model.img_size  # padded: the case that changed for the ViT
    assert torch.equal(model.normalize(images, size), model.normalize(images))
    first = model.image_encoder.patch_embed if hasattr(model.image_encoder, "patch_embed") else model.image_encoder
    cap = _Capture(first)
    try:
        with torch.no_grad():
            a = SegmentedEncoder(model)(images, input_size=size)
            b = SegmentedEncoder(model)(images)
    finally:
        cap.close()
    assert torch.equal(a, b)
    assert torch.equal(cap.inputs[0], cap.inputs[1])
    # the same 0-padded input the Predictor gives LiteMedSAM (pixel mean 0)
    assert (cap.inputs[0][..., h:, :] == 0).all() and (cap.inputs[0][..., :, w:] == 0).all()
