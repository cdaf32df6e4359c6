"""Resize to the model input: longest side -> S (SAM's ResizeLongestSide), pad bottom/right with 0."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    scale = size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """float image in [0, 255] -> (uint8 (S, S) padded, (h, w) before padding). Bilinear, antialiased."""
    h, w = resized_shape(*image.shape, size)
    resized = np.asarray(Image.fromarray(image.astype(np.float32, copy=False), mode="F").resize((w, h), Image.BILINEAR))
    out = np.zeros((size, size), np.uint8)
    out[:h, :w] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return out, (h, w)


def resize_labels(labels: np.ndarray, size: int, dtype=np.uint16) -> np.ndarray:
    """Nearest-neighbour (label ids are never blended), sampling at pixel centres."""
    H, W = labels.shape
    h, w = resized_shape(H, W, size)
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    out = np.zeros((size, size), dtype)
    out[:h, :w] = labels[rows[:, None], cols[None, :]]
    return out
