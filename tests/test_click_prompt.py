"""Click painting (models/click_prompt.py): the corrective-click encoding shared by training, evaluation
and the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
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


def _blob_logits(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, 5.0, -5.0).astype(np.float32))[None, None]


def test_merge_takes_only_the_added_region_touching_a_positive_click():
    """Previous answer: one square. The new answer adds a region at the click, adds a far region, and drops
    part of the square: only the added region touching the click is taken, the rest stays as before."""
    from medico_peft.models.click_prompt import merge_click

    prev = np.zeros((32, 32), bool)
    prev[4:12, 4:12] = True
    new = prev.copy()
    new[4:8, 4:12] = False          # drift: part of the old answer lost
    new[20:26, 20:30] = True        # the clicked region
    new[2:4, 24:30] = True          # drift: an unrelated addition
    out = merge_click(_blob_logits(prev), _blob_logits(new), torch.tensor([[[25.0, 23.0]]]), torch.tensor([[1]]),
                      radius=1.0)
    expect = prev.copy()
    expect[20:26, 20:30] = True
    assert np.array_equal(out[0, 0].numpy() > 0, expect)
    # the accepted pixels carry the new logits, the others the previous ones, exactly
    acc = torch.from_numpy(expect & ~prev)
    assert torch.equal(out[0, 0][acc], _blob_logits(new)[0, 0][acc])
    assert torch.equal(out[0, 0][~acc], _blob_logits(prev)[0, 0][~acc])


def test_merge_negative_click_removes_only_its_region_and_rows_without_clicks_keep_theirs():
    from medico_peft.models.click_prompt import merge_click

    prev = np.zeros((2, 24, 24), bool)
    prev[:, 2:20, 2:10] = True
    new = prev.copy()
    new[:, 12:20, 2:10] = False     # the negative click's region (row 0 clicks in it)
    new[:, 2:20, 14:18] = True      # added pixels: a negative click never takes those
    prev_t = torch.cat([_blob_logits(prev[0]), _blob_logits(prev[1])])
    new_t = torch.cat([_blob_logits(new[0]), _blob_logits(new[1])])
    out = merge_click(prev_t, new_t, torch.tensor([[[5.0, 15.0]], [[5.0, 15.0]]]), torch.tensor([[0], [-1]]),
                      radius=2.0)
    expect = prev[0].copy()
    expect[12:20, 2:10] = False
    assert np.array_equal(out[0, 0].numpy() > 0, expect)
    assert torch.equal(out[1], prev_t[1])  # label -1: no click this round, nothing taken


def test_merge_keeps_the_previous_answer_when_the_click_changed_nothing_near_it():
    from medico_peft.models.click_prompt import merge_click

    prev = np.zeros((16, 16), bool)
    prev[2:6, 2:6] = True
    new = prev.copy()
    new[10:14, 10:14] = True  # a change, but far from the click
    out = merge_click(_blob_logits(prev), _blob_logits(new), torch.tensor([[[3.0, 12.0]]]), torch.tensor([[1]]),
                      radius=2.0)
    assert torch.equal(out, _blob_logits(prev))


def test_predictor_merges_a_correction_locally_and_none_returns_the_decoders_answer():
    """Predictor.predict with mask_input + points: with click_merge="local" the returned mask differs from the
    previous one only in regions that touch the new click (and only by pixels of the click's kind); with
    "none" it is the backend's own answer."""
    from medico_peft.models import build_model
    from medico_peft.models.click_prompt import merge_click
    from medico_peft.runtime import Predictor

    model = build_model("vit_tiny", seed=0).eval()
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    raw = Predictor.from_torch(model, click_merge="none").set_image(image)
    local = Predictor.from_torch(model).set_image(image)
    first = raw.predict(box=[8, 8, 50, 50])
    prev_mask = first.masks[0]
    click = [[30, 30]]
    lab = [0] if prev_mask[30, 30] else [1]
    a = raw.predict(points=click, labels=lab, box=[8, 8, 50, 50], mask_input=first.low_res_logits[0])
    b = local.predict(points=click, labels=lab, box=[8, 8, 50, 50], mask_input=first.low_res_logits[0])
    side = first.low_res_logits.shape[-1]
    # "local": the decoder's answer ("none" gets the same painted prompt) merged onto the previous one
    expect = merge_click(torch.from_numpy(first.low_res_logits[:1])[None], torch.from_numpy(a.low_res_logits)[None],
                         torch.tensor([[[30.0 * side / 64, 30.0 * side / 64]]]), torch.tensor([lab]))
    assert torch.allclose(torch.from_numpy(b.low_res_logits)[None], expect)
    assert np.array_equal(b.masks, b.logits > 0)
    # merged logits move only in the click's direction, so at full resolution the mask does too
    if lab[0] == 1:
        assert not (prev_mask & ~b.masks[0]).any()  # a positive click removes nothing
    else:
        assert not (b.masks[0] & ~prev_mask).any()  # a negative click adds nothing
    with pytest.raises(Exception, match="click_merge"):
        Predictor.from_torch(model, click_merge="global")


def test_merge_positive_click_adds_nothing_outside_the_box_prompt():
    """A model that floods the background after a positive click: with the object's box, only the flood inside
    the box is taken; without it, all of it (the region touches the click)."""
    from medico_peft.models.click_prompt import merge_click

    prev = np.zeros((32, 32), bool)
    prev[8:16, 8:16] = True
    new = np.ones((32, 32), bool)
    click = torch.tensor([[[17.0, 12.0]]])
    box = torch.tensor([[6.0, 6.0, 20.0, 20.0]])
    boxed = merge_click(_blob_logits(prev), _blob_logits(new), click, torch.tensor([[1]]), radius=1.0, boxes=box)
    expect = np.zeros((32, 32), bool)
    expect[6:21, 6:21] = True
    assert np.array_equal(boxed[0, 0].numpy() > 0, expect)
    unboxed = merge_click(_blob_logits(prev), _blob_logits(new), click, torch.tensor([[1]]), radius=1.0)
    assert (unboxed[0, 0] > 0).all()


def test_merge_negative_click_that_would_erase_most_of_the_answer_removes_only_its_disk():
    """A collapse after a negative click (the new answer is empty): removing the whole connected answer would be
    taken without a guard; with it only the click's own disk goes."""
    from medico_peft.models.click_prompt import MAX_NEGATIVE_SHARE, merge_click

    prev = np.zeros((32, 32), bool)
    prev[4:28, 4:28] = True
    new = np.zeros((32, 32), bool)
    out = merge_click(_blob_logits(prev), _blob_logits(new), torch.tensor([[[16.0, 16.0]]]), torch.tensor([[0]]),
                      radius=2.0)
    yy, xx = np.mgrid[0:32, 0:32]
    expect = prev & ~((xx - 16) ** 2 + (yy - 16) ** 2 <= 4.0)
    assert np.array_equal(out[0, 0].numpy() > 0, expect)
    # a removal within the share is taken whole
    small = prev.copy()
    small[4:10, 4:28] = False
    assert (prev & ~small).sum() <= MAX_NEGATIVE_SHARE * prev.sum()
    out = merge_click(_blob_logits(prev), _blob_logits(small), torch.tensor([[[16.0, 6.0]]]), torch.tensor([[0]]),
                      radius=2.0)
    assert np.array_equal(out[0, 0].numpy() > 0, small)


def test_merge_negative_click_may_remove_a_small_answer_whole():
    """The end of a structure: a small answer (within a disk of SMALL_ANSWER_RADII click radii) that the new answer
    drops entirely is removed whole, not just under the click's disk."""
    from medico_peft.models.click_prompt import SMALL_ANSWER_RADII, merge_click

    prev = np.zeros((32, 32), bool)
    prev[12:20, 12:20] = True  # 64 pixels, well under a disk of 4 radii of 2 pixels (≈ 201)
    assert prev.sum() < np.pi * (SMALL_ANSWER_RADII * 2.0) ** 2
    out = merge_click(_blob_logits(prev), _blob_logits(np.zeros_like(prev)), torch.tensor([[[15.0, 15.0]]]),
                      torch.tensor([[0]]), radius=2.0)
    assert not (out > 0).any()


def test_merge_near_takes_the_band_a_click_touches_only_within_its_reach():
    """A thin structure: the new answer thickens a long connected band. "local" takes the whole band (it
    touches the click), "near" only the part within NEAR_RADII click radii of the click."""
    from medico_peft.models.click_prompt import NEAR_RADII, merge_click, merge_reach

    prev = np.zeros((16, 64), bool)
    prev[6:8, 2:62] = True  # a 2-pixel ribbon across the image
    new = prev.copy()
    new[8:11, 2:62] = True  # thickened along its whole length
    click = torch.tensor([[[10.0, 9.0]]])
    local = merge_click(_blob_logits(prev), _blob_logits(new), click, torch.tensor([[1]]), radius=2.0)
    assert np.array_equal(local[0, 0].numpy() > 0, new)
    reach, _ = merge_reach("near", 2.0)
    assert merge_reach("near", 2.0) == (NEAR_RADII * 2.0, NEAR_RADII * 2.0)
    assert merge_reach("local", 2.0) == (None, NEAR_RADII * 2.0) and merge_reach("none", 2.0) == (None, None)
    near = merge_click(_blob_logits(prev), _blob_logits(new), click, torch.tensor([[1]]), radius=2.0, reach=reach)
    ys, xs = np.mgrid[0:16, 0:64]
    expect = prev | (new & ((xs - 10) ** 2 + (ys - 9) ** 2 <= reach ** 2))
    assert np.array_equal(near[0, 0].numpy() > 0, expect)
    assert (near[0, 0].numpy() > 0).sum() < (local[0, 0].numpy() > 0).sum()


def test_local_merge_bounds_a_negative_clicks_removal_but_not_a_positive_clicks_addition():
    """The default "local": a negative click on a wide answer removes only within NEAR_RADII click radii of the
    click even when the decoder removes a connected band twice as long; the same band added by a positive click
    is taken whole (Dice punishes wrong removals more than wrong additions: merge_reach's doc)."""
    from medico_peft.models.click_prompt import NEAR_RADII, accept_click

    wide = np.zeros((32, 96), bool)
    wide[4:28, 2:94] = True  # the previous answer: a wide slab (the removal stays under half of it)
    thin = wide.copy()
    thin[4:10, 2:94] = False  # the decoder's answer to a negative click at (40, 6): a band along the whole top
    radius = 2.0
    neg = accept_click("local", _blob_logits(wide), _blob_logits(thin), torch.tensor([[[40.0, 6.0]]]),
                       torch.tensor([[0]]), radius=radius)
    ys, xs = np.mgrid[0:32, 0:96]
    near = (xs - 40) ** 2 + (ys - 6) ** 2 <= (NEAR_RADII * radius) ** 2
    assert np.array_equal(neg[0, 0].numpy() > 0, wide & ~(near & ~thin))
    unbounded = accept_click("local", _blob_logits(thin), _blob_logits(wide), torch.tensor([[[40.0, 6.0]]]),
                             torch.tensor([[1]]), radius=radius)
    assert np.array_equal(unbounded[0, 0].numpy() > 0, wide)  # the positive click takes the whole band back
    assert np.array_equal(accept_click("none", _blob_logits(wide), _blob_logits(thin), torch.tensor([[[40.0, 6.0]]]),
                                       torch.tensor([[0]]), radius=radius)[0, 0].numpy() > 0, thin)


def test_evaluate_cli_offers_every_click_merge_mode():
    import argparse

    from medico_peft.commands import evaluate
    from medico_peft.models.click_prompt import CLICK_MERGES

    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["evaluate"]._actions
                  if a.dest == "click_merge")
    assert tuple(action.choices) == CLICK_MERGES


def test_predictor_near_merge_equals_merge_click_with_the_near_reach():
    """Predictor(click_merge="near"): the decoder's answer to the click, merged within NEAR_RADII click radii."""
    from medico_peft.models import build_model
    from medico_peft.models.click_prompt import CLICK_RADIUS, merge_click, merge_reach
    from medico_peft.runtime import Predictor

    model = build_model("vit_tiny", seed=0).eval()
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    raw = Predictor.from_torch(model, click_merge="none").set_image(image)
    near = Predictor.from_torch(model, click_merge="near").set_image(image)
    box = [8, 8, 50, 50]
    first = raw.predict(box=box)
    lab = [0] if first.masks[0][30, 30] else [1]
    a = raw.predict(points=[[30, 30]], labels=lab, box=box, mask_input=first.low_res_logits[0])
    b = near.predict(points=[[30, 30]], labels=lab, box=box, mask_input=first.low_res_logits[0])
    s = first.low_res_logits.shape[-1] / 64
    reach, negative_reach = merge_reach("near", CLICK_RADIUS)
    expect = merge_click(torch.from_numpy(first.low_res_logits[:1])[None], torch.from_numpy(a.low_res_logits)[None],
                         torch.tensor([[[30.0 * s, 30.0 * s]]]), torch.tensor([lab]), boxes=torch.tensor([box]) * s,
                         reach=reach, negative_reach=negative_reach)
    assert torch.allclose(torch.from_numpy(b.low_res_logits)[None], expect)


def test_click_training_options_are_checked_at_the_edge_by_name():
    from medico_peft.errors import ConfigError
    from medico_peft.training import TrainConfig

    base = {"model": {"name": "vit_tiny"}, "data": {"manifest": "m.json"}}
    cfg = TrainConfig.from_dict({**base, "train": {"click_sampling": "interior"}, "loss": {"click_bce": 0.5}})
    assert cfg.train.click_sampling == "interior" and cfg.loss.click_bce == 0.5
    with pytest.raises(ConfigError, match="click_sampling"):
        TrainConfig.from_dict({**base, "train": {"click_sampling": "edges"}})
    with pytest.raises(ConfigError, match="click_bce"):
        TrainConfig.from_dict({**base, "loss": {"click_bce": -1}})
    with pytest.raises(ConfigError, match="loss.click_region"):
        TrainConfig.from_dict({**base, "loss": {"click_region": -0.5}})
    assert TrainConfig.from_dict({**base, "loss": {"click_region": 1.0}}).loss.click_region == 1.0


def test_center_click_sampling_trains_on_the_evaluation_protocols_click():
    """`train.click_sampling=center`: one click per object and sub-iteration, the one evaluation places (the centre
    of the deeper error region, computed independently here with scipy's distance transform), even though
    training hands add_clicks a random generator; the other samplings add two clicks."""
    from scipy.ndimage import distance_transform_edt

    from medico_peft.training import TrainConfig
    from medico_peft.training.interactive_step import add_clicks

    gt = torch.zeros(2, 32, 32, dtype=torch.bool)
    pred = torch.zeros(2, 32, 32, dtype=torch.bool)
    gt[0, 4:20, 4:20] = True            # object 0: the answer misses a 16×16 square -> positive click inside it
    pred[1, 2:30, 2:30] = True          # object 1: the answer is a 28×28 square around a 6×6 truth -> negative
    gt[1, 13:19, 13:19] = True
    prompt = {"points": None, "point_labels": None, "boxes": torch.zeros(2, 4), "multimask": False}
    out = add_clicks(prompt, pred, gt, torch.Generator().manual_seed(0), "center", depth=5.0)
    assert out["points"].shape == (2, 1, 2) and out["point_labels"].tolist() == [[1], [0]]
    for j, (region, label) in enumerate([(gt[0] & ~pred[0], 1), (pred[1] & ~gt[1], 0)]):
        dist = distance_transform_edt(np.pad(region.numpy(), 1))[1:-1, 1:-1]
        x, y = out["points"][j, 0].tolist()
        assert dist[int(y), int(x)] == dist.max()  # a deepest pixel of the error region
    again = add_clicks(prompt, pred, gt, torch.Generator().manual_seed(7), "center", depth=5.0)
    assert torch.equal(again["points"], out["points"])  # deterministic: the generator is not used
    two = add_clicks(prompt, pred, gt, torch.Generator().manual_seed(0), "uniform", depth=5.0)
    assert two["points"].shape == (2, 2, 2)
    cfg = TrainConfig.from_dict({"model": {"name": "vit_tiny"}, "data": {"manifest": "m.json"},
                                 "train": {"click_sampling": "center"}})
    assert cfg.train.click_sampling == "center"
