"""Augmentation applied identically to image, label map and boxes.

Geometry (flip, rot90) acts on the un-padded content region only, so padding stays at the
bottom/right and `input_size` stays meaningful (rot90 swaps it). Intensity changes (gamma,
contrast) go through a 256-entry lookup table on the uint8 image: one gather gives the float
image, and 0 stays 0 so the padding stays black.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..utils.config import check_fields, config_error, field_prefix, option


def _factor_range(name: str):
    """Parser of a (low, high) multiplicative range with 0 < low <= high."""
    def parse(value) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise config_error(name, f"expected two numbers (low, high), got {value!r}") from None
        if not 0 < lo <= hi:
            raise config_error(name, f"({lo}, {hi}) should satisfy 0 < low <= high")
        return lo, hi
    return parse


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = option(True, help="random horizontal/vertical flips")
    rot90: bool = option(True, help="random 90-degree rotations")
    gamma: tuple[float, float] = option((0.7, 1.5), parse=_factor_range("gamma"),
                                        help="gamma range, sampled log-uniformly")
    contrast: tuple[float, float] = option((0.9, 1.1), parse=_factor_range("contrast"), help="contrast factor range")
    p_intensity: float = option(0.5, min=0.0, max=1.0, help="probability of the intensity changes")

    def __post_init__(self):
        with field_prefix("augment"):
            check_fields(self)


IDENTITY_LUT = (np.arange(256, dtype=np.float32) / 255.0)
IDENTITY_LUT.flags.writeable = False  # shared; apply_lut recognises it by identity


def _pair_table(lut: np.ndarray) -> np.ndarray:
    """65536-entry table of two float32 values per uint16 (= two uint8 pixels, little-endian)."""
    table = np.empty((256, 256, 2), np.float32)
    table[:, :, 0] = lut[None, :]  # low byte = first pixel
    table[:, :, 1] = lut[:, None]
    return table.view(np.uint64).reshape(65536)


def apply_lut(content: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    """out[...] = lut[content] for a uint8 array (any strides), bit-identical to np.take(lut, content).

    Why not plain np.take: it first widens the indices to intp (8 bytes per pixel), which made it
    the single largest cost of a 1024² item. The identity table is an exact float32 division;
    other tables gather two pixels per uint16 index (half the gathers and index memory).
    """
    if lut is IDENTITY_LUT:
        np.divide(content, np.float32(255.0), out=out, dtype=np.float32)
        return
    if sys.byteorder == "little" and content.shape[-1] % 2 == 0:
        dst = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        src = np.ascontiguousarray(content)  # the one copy a rot90 view needs (uint8, not float32)
        np.take(_pair_table(lut), src.view(np.uint16), out=dst.view(np.uint64), mode="clip")
        if dst is not out:
            out[...] = dst
        return
    np.take(lut, content, out=out, mode="clip")


@dataclass(frozen=True)
class Geometry:
    """k counter-clockwise quarter turns after an optional left-right flip, on an h x w region."""

    flip: bool = False
    k: int = 0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """View (no copy) of the transformed region; works on (..., h, w) arrays."""
        if self.flip:
            array = array[..., ::-1]
        return np.rot90(array, self.k, axes=(-2, -1)) if self.k else array

    def boxes(self, boxes: np.ndarray, h: int, w: int) -> np.ndarray:
        """Transform inclusive xyxy boxes (N, 4) of an h x w region the same way as `apply`."""
        b = boxes.astype(np.int64).copy()
        if self.flip:
            b[:, [0, 2]] = w - 1 - b[:, [2, 0]]
        for _ in range(self.k):  # one turn: (x, y) -> (y, w-1-x), region becomes w x h
            b = np.stack([b[:, 1], w - 1 - b[:, 2], b[:, 3], w - 1 - b[:, 0]], axis=1)
            h, w = w, h
        return b

    def size(self, h: int, w: int) -> tuple[int, int]:
        return (w, h) if self.k % 2 else (h, w)


def sample_geometry(cfg: AugmentConfig | None, rng: np.random.Generator) -> Geometry:
    if cfg is None:
        return Geometry()
    return Geometry(flip=bool(cfg.flip and rng.random() < 0.5), k=int(rng.integers(0, 4)) if cfg.rot90 else 0)


def sample_lut(cfg: AugmentConfig | None, rng: np.random.Generator) -> np.ndarray:
    if cfg is None or rng.random() >= cfg.p_intensity:
        return IDENTITY_LUT
    gamma = float(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
    contrast = float(rng.uniform(*cfg.contrast))
    return np.clip(IDENTITY_LUT ** gamma * contrast, 0.0, 1.0).astype(np.float32)
