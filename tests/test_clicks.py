"""Corrective clicks land in the right error region (property-based) and metrics behave at the edges."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medico_peft.evaluation.clicks import center_correction, interior_corrections, random_corrections
from medico_peft.evaluation.metrics import dice_per_object, iou_per_object

masks = arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_corrections_fall_in_error_regions(data):
    gt = data.draw(masks)
    pred = data.draw(arrays(np.bool_, gt.shape))
    points, labels = random_corrections(torch.from_numpy(pred), torch.from_numpy(gt), torch.Generator().manual_seed(0))
    assert points.shape == (gt.shape[0], 2, 2) and labels.shape == (gt.shape[0], 2)
    for k in range(gt.shape[0]):
        fn, fp = gt[k] & ~pred[k], pred[k] & ~gt[k]
        for j, (region, want) in enumerate([(fn, 1), (fp, 0)]):
            if region.any():
                x, y = points[k, j].long().tolist()
                assert labels[k, j] == want and region[y, x]
            else:
                assert labels[k, j] == -1


@settings(max_examples=60, deadline=None)
@given(data=st.data(), depth=st.floats(0.0, 4.0))
def test_interior_corrections_land_deep_in_their_error_region(data, depth):
    from scipy.ndimage import distance_transform_edt

    gt = data.draw(masks)
    pred = data.draw(arrays(np.bool_, gt.shape))
    points, labels = interior_corrections(torch.from_numpy(pred), torch.from_numpy(gt), depth,
                                          torch.Generator().manual_seed(1))
    for k in range(gt.shape[0]):
        for j, (region, want) in enumerate([(gt[k] & ~pred[k], 1), (pred[k] & ~gt[k], 0)]):
            if not region.any():
                assert labels[k, j] == -1
                continue
            dist = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            x, y = points[k, j].long().tolist()
            assert labels[k, j] == want and region[y, x]
            assert dist[y, x] >= min(depth, dist.max())  # as deep as asked, or the deepest there is


def test_interior_corrections_avoid_the_thin_band_and_random_ones_do_not():
    gt = np.zeros((1, 40, 40), bool)
    gt[0, 5:35, 5:35] = True
    pred = np.zeros_like(gt)
    pred[0, 5:35, 6:35] = True  # a one-pixel band missed on the left...
    pred[0, 20:30, 20:30] = False  # ...and a 10x10 hole in the middle
    hole = np.zeros_like(gt[0])
    hole[20:30, 20:30] = True
    g = torch.Generator().manual_seed(0)
    deep = [interior_corrections(torch.from_numpy(pred), torch.from_numpy(gt), 3.0, g)[0][0, 0] for _ in range(30)]
    assert all(hole[int(y), int(x)] for x, y in deep)
    g = torch.Generator().manual_seed(0)
    anywhere = [random_corrections(torch.from_numpy(pred), torch.from_numpy(gt), g)[0][0, 0] for _ in range(60)]
    assert not all(hole[int(y), int(x)] for x, y in anywhere)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_center_correction_picks_a_pixel_of_the_larger_error(data):
    gt = data.draw(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
    pred = data.draw(arrays(np.bool_, gt.shape))
    click = center_correction(pred, gt)
    if (pred == gt).all():
        assert click is None
        return
    (x, y), label = click
    region = (gt & ~pred) if label == 1 else (pred & ~gt)
    assert region[int(y), int(x)]


def test_center_correction_clicks_the_middle_of_a_missed_square():
    gt = np.zeros((20, 20), bool)
    gt[5:14, 5:14] = True
    (x, y), label = center_correction(np.zeros_like(gt), gt)
    assert label == 1 and (x, y) == (9.0, 9.0)


def test_dice_and_iou_edges():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[1, :2] = True
    b[1, :1] = True
    a[2, 0, 0] = True
    d = dice_per_object(a, b)
    assert d[0] == 1.0  # both empty
    assert torch.isclose(d[1], torch.tensor(2 * 4 / (8 + 4)))
    assert d[2] == 0.0
    assert torch.isclose(iou_per_object(a, b)[1], torch.tensor(0.5))
