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


# Pillow's fixed-point precision for 8-bit images (Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PIL_PRECISION = 22


def _pil_bilinear_weights(in_size, out_size) -> torch.Tensor:
    """Pillow's bilinear (antialiased) resampling coefficients as an (out, in) float32 matrix of integers < 2**22.

    Pillow (`precompute_coeffs` + `normalize_coeffs_8bpc`) evaluates the triangle filter at
    (j + 0.5 - center) / filterscale, center = (i + 0.5)·in/out, filterscale = max(in/out, 1) (the support
    widens when shrinking: antialias), normalises each row by its sum and rounds w·2**22 half up.
    Every one of these values is a ratio of integers: with D = 2·max(in, out) and
    n = (2j + 1)·out − (2i + 1)·in, the filter value is (D − |n|) / D, so the coefficient is
    floor((2**23·(D − |n|) + S) / (2·S)) with S the row sum of (D − |n|) — computed here in int64, exactly,
    with the same result on torch, onnxruntime and any engine with int64 arithmetic.
    Sizes may be 0-dim tensors (traced into the ONNX graph).
    """
    n_in = torch.as_tensor(in_size).to(torch.int64)
    n_out = torch.as_tensor(out_size).to(torch.int64)
    d = 2 * torch.maximum(n_in, n_out)
    i = torch.arange(out_size, dtype=torch.int64)
    j = torch.arange(in_size, dtype=torch.int64)
    n = (2 * j[None, :] + 1) * n_out - (2 * i[:, None] + 1) * n_in
    a = torch.clamp(d - torch.abs(n), min=0)                   # triangle filter, scaled by D
    s = torch.clamp(torch.sum(a, dim=1, keepdim=True), min=1)
    q = torch.div((a * (1 << (_PIL_PRECISION + 1)) + s), 2 * s, rounding_mode="floor")
    return q.to(torch.float32)


def _pil_pass(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """One Pillow resampling pass along the last axis of uint8-valued float32 `x`, rounded as Pillow does.

    Pillow sums pixel × coefficient in 32-bit integers (sums up to 2**30) and keeps
    clip8((sum + 2**21) >> 22). float32 holds integers exactly only below 2**24, so each coefficient
    is split into 6 + 8 + 8 bits; the three partial sums are exact in float32 (and under TF32: every
    factor has at most 8 significant bits) whatever the summation order, and carrying between them
    yields Pillow's result exactly.
    """
    hi = torch.floor(coeffs / 65536.0)
    mid = torch.floor((coeffs - hi * 65536.0) / 256.0)
    lo = coeffs - hi * 65536.0 - mid * 256.0
    n_out = coeffs.shape[0]
    parts = torch.cat([hi, mid, lo], dim=0).to(torch.float32)  # (3·out, in)
    sums = torch.matmul(x, parts.transpose(0, 1))
    a, b, c = sums[..., :n_out], sums[..., n_out:2 * n_out], sums[..., 2 * n_out:]
    t1 = b + torch.floor(c / 256.0)                    # sum = a·2^16 + t1·2^8 + (c mod 2^8)
    t2 = a + torch.floor(t1 / 256.0)                   # sum = t2·2^16 + r, 0 <= r < 2^16
    return torch.clamp(torch.floor((t2 + 32.0) / 64.0), 0.0, 255.0)  # (sum + 2^21) >> 22, clipped


def pil_resize_uint8_graph(image: torch.Tensor, out_h, out_w) -> torch.Tensor:
    """(H, W, C) uint8 → (C, out_h, out_w) float32 uint8 values: Pillow's bilinear resize in tensor ops
    (traceable into ONNX), a horizontal pass rounded to uint8, then a vertical pass, as Pillow's
    `ImagingResampleInner` source does.

    The installed Pillow (13) runs the vertical pass first for some size pairs (an order chosen
    inside its C code); for those the two orders differ by 1 grey level on part of the pixels.
    Whenever it runs the horizontal pass first — e.g. every upscale of both sides, such as
    480×640 → 768×1024 — the result equals Pillow's exactly (tests/test_official_predictor.py).
    A pass whose size does not change is the identity, as Pillow's skipped pass is.
    """
    shape = torch._shape_as_tensor(image)
    x = image.to(torch.float32).permute(2, 0, 1)                    # (C, H, W)
    x = _pil_pass(x, _pil_bilinear_weights(shape[1], out_w))        # (C, H, out_w)
    x = _pil_pass(x.transpose(1, 2), _pil_bilinear_weights(shape[0], out_h))  # (C, out_w, out_h)
    return x.transpose(1, 2)


def preprocess_image(image: torch.Tensor, img_size: int, mode: str, pad_value=None) -> torch.Tensor:
    """(H, W, 3) uint8/float image → (1, 3, S, S) float in [0, 1], longest side S, padded bottom/right.

    `mode` "div255" (SAM on uint8 input) reproduces official `SamPredictor.set_image`: Pillow's antialiased
    bilinear resize rounded to uint8 (`pil_resize_uint8_graph`: Pillow's fixed-point arithmetic in tensor
    ops, the same in eager torch and in the ONNX graph), then /255. "minmax" (LiteMedSAM, and every float
    image) interpolates in float and min-max normalises, as LiteMedSAM was trained.
    `pad_value`: per-channel fill of the padding, in the same [0, 1] units — pass the model's `pixel_mean`
    so that after `(x - mean) / std` the padding is exactly 0, as official SAM pads after normalising;
    None pads with 0.
    Traceable: H and W are read from the tensor shape, so the ONNX graph accepts any size.
    """
    shape = torch._shape_as_tensor(image)
    h, w = resized_hw(shape[0], shape[1], img_size)
    hi, wi = h.to(torch.int64), w.to(torch.int64)
    if mode == "div255" and image.dtype == torch.uint8:
        x = pil_resize_uint8_graph(image, hi, wi).unsqueeze(0) / 255.0
    else:
        x = image.to(torch.float32).permute(2, 0, 1).unsqueeze(0)
        x = F.interpolate(x, size=(hi, wi), mode="bilinear", align_corners=False)
    if mode == "minmax":
        lo, hi_v = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi_v - lo, min=1e-8)
    else:
        x = torch.clamp(x / 255.0, 0.0, 1.0) if image.dtype != torch.uint8 else x
    pad = (0, img_size - wi, 0, img_size - hi)
    if pad_value is None:
        return F.pad(x, pad)
    fill = torch.as_tensor(pad_value, dtype=torch.float32).reshape(1, -1, 1, 1)
    idx = torch.arange(img_size)
    content = (idx[:, None] < hi) & (idx[None, :] < wi)  # (S, S): the resized image, not the padding
    return torch.where(content, F.pad(x, pad), fill)


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
