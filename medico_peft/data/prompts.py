"""Prompt sampling for one object: a (jittered) box, positive points inside, negative points near it.

Everything works on the object's bounding-box crop, never the whole image, so the cost scales
with the object and not with the 1024² input.
Conventions: boxes are xyxy with inclusive pixel coordinates (x = column); a point (x, y) is the
pixel at row y, column x. Point label 1 = positive, 0 = negative, -1 = no point (padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..utils.config import check_fields, field_prefix, option

MaskOf = Callable[[slice, slice], np.ndarray]  # (rows, cols) -> bool array of that region


@dataclass(frozen=True)
class PromptConfig:
    n_positive: int = option(1, min=0, help="positive points sampled inside the object")
    n_negative: int = option(0, min=0, help="negative points sampled near it")
    box_jitter: float = option(0.025, min=0.0, max=1.0,
                               help="each box side moves by up to this share of the box size (micro-sam)")
    centre_point: bool = option(False, help="first positive point at the max of the object's distance transform")
    negative_margin: float = option(0.1, min=0.0, max=1.0,
                                    help="negatives come from the box grown by this share of its size (>= 2 px)")
    negative_dilation: int = option(3, min=0, help="... and lie outside the object dilated by this many pixels")

    def __post_init__(self):
        with field_prefix("prompts"):
            check_fields(self)

    @property
    def n_points(self) -> int:
        return self.n_positive + self.n_negative


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Inclusive xyxy box of a boolean mask via row/column projections, or None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def _random_pixels(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` (row, col) pixels where `region` is True (with replacement); empty if none."""
    h, w = region.shape
    rows = rng.integers(0, h, size=count * 4)
    cols = rng.integers(0, w, size=count * 4)
    hit = region[rows, cols]
    if hit.sum() >= count:  # rejection sampling: cheap when the region fills its box reasonably
        return np.stack([rows[hit][:count], cols[hit][:count]], axis=1)
    flat = np.flatnonzero(region)
    if flat.size == 0:
        return np.zeros((0, 2), np.int64)
    pick = flat[rng.integers(0, flat.size, size=count)]
    return np.stack([pick // w, pick % w], axis=1)


def deepest_pixel(region: np.ndarray) -> tuple[int, int, float]:
    """(row, col, distance) of the pixel farthest from the outside of a boolean region.

    The image border counts as outside (the region is padded before the distance transform), so the
    pixel lies in the middle of the region even for a ring or a C shape. The first maximum in row-major
    order wins; an empty region gives (0, 0, 0.0).
    """
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c), float(dist[r, c])


def object_prompts(mask_of: MaskOf, box: np.ndarray, bounds: tuple[int, int], rng: np.random.Generator,
                   cfg: PromptConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box (4,) float32, points (P, 2) float32 xy and labels (P,) int64 for the object in `box`.

    `bounds` = (h, w) of the valid image area; jittered boxes and negatives stay inside it.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = bounds
    crop = mask_of(slice(y0, y1 + 1), slice(x0, x1 + 1))
    points = np.zeros((cfg.n_points, 2), np.float32)
    labels = np.full(cfg.n_points, -1, np.int64)

    n_random = cfg.n_positive
    positives = []
    if cfg.centre_point and cfg.n_positive:
        positives.append(deepest_pixel(crop)[:2])
        n_random -= 1
    if n_random > 0 or not positives:  # one anchor pixel is always needed for the box check below
        positives.extend(map(tuple, _random_pixels(crop, max(n_random, 1), rng)))
    anchor_y, anchor_x = positives[0][0] + y0, positives[0][1] + x0
    for i, (r, c) in enumerate(positives[: cfg.n_positive]):
        points[i] = (c + x0, r + y0)
        labels[i] = 1

    if cfg.n_negative:
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        mx, my = max(2, int(cfg.negative_margin * bw)), max(2, int(cfg.negative_margin * bh))
        ry0, ry1, rx0, rx1 = max(0, y0 - my), min(h, y1 + my + 1), max(0, x0 - mx), min(w, x1 + mx + 1)
        obj = mask_of(slice(ry0, ry1), slice(rx0, rx1))
        candidates = ~obj
        if cfg.negative_dilation:
            from scipy.ndimage import binary_dilation

            dilated_out = ~binary_dilation(obj, iterations=cfg.negative_dilation)
            if dilated_out.any():
                candidates = dilated_out
        if not candidates.any():  # the object fills its neighbourhood: look anywhere in the image
            ry0, rx0 = 0, 0
            candidates = ~mask_of(slice(0, h), slice(0, w))
        picks = _random_pixels(candidates, cfg.n_negative, rng)
        for j, (r, c) in enumerate(picks):
            points[cfg.n_positive + j] = (c + rx0, r + ry0)
            labels[cfg.n_positive + j] = 0

    jittered = np.array([x0, y0, x1, y1], np.float32)
    if cfg.box_jitter:
        size = np.array([x1 - x0 + 1, y1 - y0 + 1] * 2, np.float32)
        jittered += rng.uniform(-cfg.box_jitter, cfg.box_jitter, 4).astype(np.float32) * size
        jittered = np.clip(jittered, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
        # Keep an object pixel inside, so the jittered box always overlaps the object.
        jittered[0], jittered[2] = min(jittered[0], anchor_x), max(jittered[2], anchor_x)
        jittered[1], jittered[3] = min(jittered[1], anchor_y), max(jittered[3], anchor_y)
    return jittered, points, labels


def prompts_for_mask(mask: np.ndarray, rng: np.random.Generator, cfg: PromptConfig = PromptConfig()):
    """Convenience for a full boolean mask: returns (exact box, jittered box, points, labels)."""
    mask = np.asarray(mask, bool)
    box = mask_box(mask)
    if box is None:
        raise ValueError("empty mask has no prompts")
    jittered, points, labels = object_prompts(lambda ys, xs: mask[ys, xs], box, mask.shape, rng, cfg)
    return box, jittered, points, labels
