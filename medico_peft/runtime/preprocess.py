"""Image and prompt preprocessing shared by every backend (and traced into the ONNX graphs).

One implementation, written with tensor ops only, is used by the torch backend, by the ONNX
encoder's in-graph preprocessing and by the predictor before onnxruntime/TensorRT — so every
backend sees the same pixels. Sizes are computed arithmetically from tensors (never `int()` of
a traced value), so an exported graph stays correct for every aspect ratio.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..models.postprocess import upscale_logits


def intensity_mode(family: str, dtype) -> str:
    """LiteMedSAM was trained on min-max normalised images; SAM on 0..255 RGB → uint8/255.

    Float images have no fixed range in medicine (CT in HU, MR arbitrary), so they are always
    min-max normalised.
    """
    if family == "tinyvit" or np.dtype(dtype).kind == "f":
        return "minmax"
    return "div255"


def _as_float(v) -> torch.Tensor:
    return v.to(torch.float32) if isinstance(v, torch.Tensor) else torch.tensor(float(v))


def resized_hw(h, w, size: int):
    """Size after resizing the longest side to `size` (rounded), for ints or 0-dim tensors."""
    if isinstance(h, torch.Tensor) or isinstance(w, torch.Tensor):
        h, w = _as_float(h), _as_float(w)
        scale = size / torch.maximum(h, w)
        return torch.floor(h * scale + 0.5), torch.floor(w * scale + 0.5)
    scale = size / max(h, w)
    return int(np.floor(h * scale + 0.5)), int(np.floor(w * scale + 0.5))


def preprocess_image(image: torch.Tensor, img_size: int, mode: str) -> torch.Tensor:
    """(H, W, 3) uint8/float image → (1, 3, S, S) float in [0, 1], longest side S, zero-padded bottom/right.

    Traceable: H and W are read from the tensor shape, so the ONNX graph accepts any size.
    """
    x = image.to(torch.float32).permute(2, 0, 1).unsqueeze(0)
    shape = torch._shape_as_tensor(image)
    h, w = resized_hw(shape[0], shape[1], img_size)
    hi, wi = h.to(torch.int64), w.to(torch.int64)
    x = F.interpolate(x, size=(hi, wi), mode="bilinear", align_corners=False)
    if mode == "minmax":
        lo, hi_v = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi_v - lo, min=1e-8)
    else:
        x = torch.clamp(x / 255.0, 0.0, 1.0)
    return F.pad(x, (0, img_size - wi, 0, img_size - hi))


def as_hwc3(image, name: str = "image") -> np.ndarray:
    """Validate a user image (H×W, H×W×1 or H×W×3; uint8 or float) and return H×W×3 contiguous."""
    arr = np.asarray(image)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise DataError(f"{name}: dtype {arr.dtype} not supported; expected uint8 or float")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{name}: shape {arr.shape} not supported; expected H×W, H×W×1 or H×W×3")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"{name}: image {arr.shape[0]}×{arr.shape[1]} is too small; expected at least 2×2")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{name}: contains NaN or infinite values")
        arr = arr.astype(np.float32)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.float32)  # 16-bit CT/MR: treated as float intensities (min-max)
    return np.ascontiguousarray(arr)


def build_prompt_arrays(orig_hw: tuple[int, int], points=None, labels=None, box=None):
    """User prompts in original-image pixels → SAM decoder arrays (1, N, 2) float32 and (1, N) float32.

    Labels: 1 positive, 0 negative; a box becomes two corner points with labels 2 and 3; without
    a box a padding point (label −1) is appended, exactly as SAM's prompt encoder does.
    """
    h, w = orig_hw
    coords, labs = [], []
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        lab = np.ones(len(pts), np.float32) if labels is None else np.asarray(labels, np.float32).reshape(-1)
        if len(lab) != len(pts):
            raise DataError(f"labels: {len(lab)} labels for {len(pts)} points; expected one per point")
        if not set(np.unique(lab).tolist()) <= {0.0, 1.0}:
            raise DataError(f"labels: expected 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
        _check_inside(pts, h, w, "points")
        coords.append(pts)
        labs.append(lab)
    if box is not None:
        b = np.asarray(box, dtype=np.float32).reshape(-1)
        if b.shape != (4,):
            raise DataError(f"box: expected 4 numbers x0 y0 x1 y1, got {b.size}")
        if b[2] < b[0] or b[3] < b[1]:
            raise DataError(f"box: expected x0 <= x1 and y0 <= y1, got {b.tolist()}")
        _check_inside(b.reshape(2, 2), h, w, "box")
        coords.append(b.reshape(2, 2))
        labs.append(np.array([2.0, 3.0], np.float32))
    if not coords:
        raise DataError("prompt: no points and no box given; expected at least one point or a box")
    if box is None:
        coords.append(np.zeros((1, 2), np.float32))
        labs.append(np.array([-1.0], np.float32))
    return np.concatenate(coords)[None], np.concatenate(labs)[None]


def _check_inside(pts: np.ndarray, h: int, w: int, name: str) -> None:
    if not np.isfinite(pts).all():
        raise DataError(f"{name}: contains NaN or infinite coordinates")
    bad = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
    if bad.any():
        raise DataError(f"{name}: {pts[bad][0].tolist()} (x, y) lies outside the {w}×{h} (width×height) image")


def upscale_masks(low_res: torch.Tensor, orig_hw, img_size: int) -> torch.Tensor:
    """Low-res logits (1, M, 4E, 4E) → logits at the original size: upsample to S, crop padding, resize.

    Traceable with `orig_hw` a float tensor (h, w); used in the ONNX decoder and by the predictor.
    """
    h, w = _as_float(orig_hw[0]), _as_float(orig_hw[1])
    return upscale_logits(low_res, img_size, resized_hw(h, w, img_size), (h, w))
