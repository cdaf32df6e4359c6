"""Click painting (models/click_prompt.py): the corrective-click encoding shared by training, evaluation
and the Predictor."""

from __future__ import annotations

import numpy as np
import torch

from medico_peft.models.click_prompt import CLICK_VALUE, paint_clicks


def test_disks_of_each_row_and_sign_and_nothing_else():
    low = torch.randn(2, 1, 16, 16)
    pts = torch.tensor([[[4.0, 5.0], [12.0, 12.0]], [[8.0, 2.0], [0.0, 0.0]]])
    lab = torch.tensor([[1, 0], [0, -1]])
    out = paint_clicks(low, pts, lab, radius=2.0)
    yy, xx = np.mgrid[0:16, 0:16]
    expect = low.clone().numpy()
    for j in range(2):
        for (x, y), l in zip(pts[j].tolist(), lab[j].tolist()):
            if l in (0, 1):
                expect[j, 0][(xx - x) ** 2 + (yy - y) ** 2 <= 4.0] = CLICK_VALUE if l == 1 else -CLICK_VALUE
    assert np.array_equal(out.numpy(), expect)
    assert not torch.equal(out, low) and low.shape == out.shape  # a copy; the input is untouched


def test_box_corners_padding_and_radius_zero_paint_nothing():
    low = torch.zeros(1, 1, 8, 8)
    pts = torch.tensor([[[1.0, 1.0], [6.0, 6.0], [3.0, 3.0]]])
    assert torch.equal(paint_clicks(low, pts, torch.tensor([[2, 3, -1]]), radius=3.0), low)
    assert paint_clicks(low, pts, torch.tensor([[1, 1, 1]]), radius=0.0) is low


def test_scale_maps_input_pixels_onto_the_mask_grid():
    """A 1024² input on a 256² mask grid: the click at input (400, 800) lands at grid (100, 200)."""
    low = torch.zeros(1, 1, 256, 256)
    out = paint_clicks(low, torch.tensor([[[400.0, 800.0]]]), torch.tensor([[1]]), scale=0.25, radius=1.0)
    assert out[0, 0, 200, 100] == CLICK_VALUE and out.sum() == 5 * CLICK_VALUE


def test_predictor_paints_clicks_into_the_mask_input_it_is_given():
    """Predictor.predict(points, mask_input=prev) feeds the backend prev with the clicks painted in, in
    mask-grid coordinates of the original image (longest side fills the input); without a mask input or
    with click_radius=0 it feeds exactly what official SAM would."""
    from medico_peft.models import build_model
    from medico_peft.runtime import Predictor

    model = build_model("vit_tiny", seed=0).eval()
    seen = []
    pred = Predictor.from_torch(model)
    orig_decode = pred.backend.decode

    def spy(emb, coords, labels, mask_input, has_mask, orig_hw, multimask):
        seen.append(None if mask_input is None else np.asarray(mask_input).copy())
        return orig_decode(emb, coords, labels, mask_input, has_mask, orig_hw, multimask)

    pred.backend.decode = spy
    image = np.random.default_rng(0).random((60, 120)).astype(np.float32)
    pred.set_image(image)
    first = pred.predict(box=[10, 10, 80, 50])
    side = first.low_res_logits.shape[-1]
    pred.predict(points=[[60, 30]], labels=[0], box=[10, 10, 80, 50], mask_input=first.low_res_logits[0])
    fed = seen[-1][0, 0]
    gy, gx = round(30 * side / 120), round(60 * side / 120)
    assert fed[gy, gx] == -CLICK_VALUE
    untouched = np.abs(fed - first.low_res_logits[0]) > 0
    assert untouched.sum() < (np.pi * 6 ** 2)  # only the disk changed
    pred.click_radius = 0.0
    pred.predict(points=[[60, 30]], labels=[0], box=[10, 10, 80, 50], mask_input=first.low_res_logits[0])
    assert np.array_equal(seen[-1][0, 0], first.low_res_logits[0])
