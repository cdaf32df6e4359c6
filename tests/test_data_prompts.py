"""Property-based tests of the prompt sampler and the box/array geometry of augmentation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medico_peft.data.augment import Geometry
from medico_peft.data.prompts import PromptConfig, deepest_pixel, mask_box, prompts_for_mask

masks = st.integers(1, 24).flatmap(
    lambda h: st.integers(1, 24).flatmap(lambda w: arrays(bool, (h, w)))
).filter(lambda m: m.any())
configs = st.builds(
    PromptConfig,
    n_positive=st.integers(1, 3), n_negative=st.integers(0, 3),
    box_jitter=st.sampled_from([0.0, 0.025, 0.2, 1.0]), centre_point=st.booleans(),
    negative_margin=st.sampled_from([0.0, 0.1, 0.5]), negative_dilation=st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(mask=masks, cfg=configs, seed=st.integers(0, 2**16))
def test_prompts_respect_the_mask(mask, cfg, seed):
    h, w = mask.shape
    box, jittered, points, labels = prompts_for_mask(mask, np.random.default_rng(seed), cfg)
    ys, xs = np.nonzero(mask)
    assert tuple(box) == (xs.min(), ys.min(), xs.max(), ys.max())  # exact box is tight and contains all
    x0, y0, x1, y1 = jittered
    assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1  # inside the image
    assert np.any((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1))  # still overlaps the object
    assert points.shape == (cfg.n_points, 2) and labels.shape == (cfg.n_points,)
    for (x, y), label in zip(points, labels):
        if label == 1:
            assert mask[int(y), int(x)]
        elif label == 0:
            assert not mask[int(y), int(x)] and 0 <= x < w and 0 <= y < h
    assert (labels[: cfg.n_positive] == 1).all()
    if not mask.all():
        assert (labels[cfg.n_positive:] == 0).all()  # a negative exists somewhere, so it is found
    if cfg.centre_point:
        from scipy.ndimage import distance_transform_edt

        dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert dist[int(points[0, 1]), int(points[0, 0])] == dist.max()


def test_one_pixel_and_border_objects():
    cfg = PromptConfig(n_positive=2, n_negative=2, centre_point=True)
    for r, c in [(0, 0), (9, 9), (0, 9), (5, 5)]:
        mask = np.zeros((10, 10), bool)
        mask[r, c] = True
        box, jittered, points, labels = prompts_for_mask(mask, np.random.default_rng(0), cfg)
        assert tuple(box) == (c, r, c, r) and np.allclose(jittered, (c, r, c, r), atol=0.03)
        assert (points[:2] == [c, r]).all() and (labels == [1, 1, 0, 0]).all()
        assert not mask[points[2:, 1].astype(int), points[2:, 0].astype(int)].any()


@settings(max_examples=200, deadline=None)
@given(mask=masks, flip=st.booleans(), k=st.integers(0, 3))
def test_geometry_moves_boxes_with_pixels(mask, flip, k):
    g = Geometry(flip=flip, k=k)
    moved = g.apply(mask)
    assert moved.shape == g.size(*mask.shape)
    assert tuple(g.boxes(mask_box(mask)[None], *mask.shape)[0]) == tuple(mask_box(moved))


@settings(max_examples=100, deadline=None)
@given(mask=masks)
def test_deepest_pixel_is_inside_and_counts_the_border_as_outside(mask):
    from scipy.ndimage import distance_transform_edt

    r, c, d = deepest_pixel(mask)
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert mask[r, c] and d == dist.max() == dist[r, c] >= 1.0
    assert deepest_pixel(np.zeros_like(mask)) == (0, 0, 0.0)
    ring = np.zeros((21, 21), bool)
    ring[2:19, 2:19] = True
    ring[8:13, 8:13] = False
    r, c, _ = deepest_pixel(ring)
    assert ring[r, c] and tuple(mask_box(ring)) == (2, 2, 18, 18)
