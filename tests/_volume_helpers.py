"""A deterministic stand-in backend and synthetic ball volumes for the volume tests.

`ThresholdBackend` implements the backend protocol the Predictor uses (encode / decode, img_size,
embedding_size): the "embedding" is the slice itself in the model frame, and the decoder answers
"bright pixels inside the box" (or near a positive point when there is no box), minus a disk around
every negative point. Its answer is known in advance, so propagation, stopping and corrections can be
checked exactly; the real models are covered by the torch/onnxruntime tests beside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medico_peft.runtime.preprocess import resized_hw


class ThresholdBackend:
    name = "threshold"
    full_res_output = False

    def __init__(self, img_size: int = 64, iou: float = 0.9, neg_radius: float = 3.0, pos_radius: float = 12.0):
        self.img_size = img_size
        self.embedding_size = img_size // 4
        self.iou = iou
        self.neg_radius = neg_radius
        self.pos_radius = pos_radius
        self.encoded = 0

    def encode(self, image_hwc3: np.ndarray) -> torch.Tensor:
        self.encoded += 1
        x = torch.from_numpy(image_hwc3[..., 0].astype(np.float32))[None, None]
        h, w = resized_hw(*image_hwc3.shape[:2], self.img_size)
        x = F.interpolate(x, size=(h, w), mode="nearest")
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))  # (1, 1, S, S) frame

    def decode(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        s = self.img_size
        h, w = orig_hw
        nh, nw = resized_hw(h, w, s)
        coords = np.asarray(coords, np.float32)[0] * np.array([nw / w, nh / h], np.float32)
        labels = np.asarray(labels)[0]
        frame = embeddings[0, 0].numpy()
        bright = frame > 127
        yy, xx = np.mgrid[:s, :s] + 0.5
        if (labels == 2).any():
            (x0, y0), (x1, y1) = coords[labels == 2][0], coords[labels == 3][0]
            region = (xx >= x0) & (xx <= x1 + 1) & (yy >= y0) & (yy <= y1 + 1)
        else:
            region = np.zeros((s, s), bool)
            for (x, y) in coords[labels == 1]:
                region |= (xx - x - 0.5) ** 2 + (yy - y - 0.5) ** 2 <= self.pos_radius ** 2
        out = bright & region
        for (x, y) in coords[labels == 0]:
            out &= (xx - x - 0.5) ** 2 + (yy - y - 0.5) ** 2 > self.neg_radius ** 2
        low = torch.from_numpy(np.where(out, 10.0, -10.0).astype(np.float32))[None, None]
        low = F.interpolate(low, size=(4 * self.embedding_size,) * 2, mode="nearest")
        return low, torch.full((1, 1), float(self.iou))


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ball (radius in mm) on a grid of `spacing`."""
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius ** 2


def ball_volume(shape=(24, 40, 36), centre=(12, 20, 17), radius=7.0, spacing=(1.0, 1.0, 1.0), seed=0):
    truth = ball(shape, centre, radius, spacing)
    rng = np.random.default_rng(seed)
    vol = (truth * 200.0 + 20.0 + rng.normal(0, 3, shape)).astype(np.float32)
    return vol, truth


def extent(mask: np.ndarray, axis: int) -> tuple[int, int] | None:
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return (int(present[0]), int(present[-1])) if present.size else None


def dice(a, b) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s
