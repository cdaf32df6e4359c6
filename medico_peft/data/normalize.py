"""Intensity normalisation presets: raw scanner values -> uint8 in [0, 255].

Shards store uint8 (4x smaller than float32); the preset is recorded so a model is always fed
the same intensity convention it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# CT windows as (level, width) in Hounsfield units.
CT_WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
MR_PERCENTILES = (0.5, 99.5)
PRESETS = tuple(f"ct_{name}" for name in CT_WINDOWS) + ("mr_percentile", "minmax")
DEFAULT_FOR_MODALITY = {"ct": "ct_soft_tissue", "mr": "mr_percentile", "other": "minmax"}
MODALITIES = tuple(DEFAULT_FOR_MODALITY)


def resolve_preset(modality: str, preset: str | None) -> str:
    if modality not in MODALITIES:
        raise ConfigError(f"modality: {modality!r} is not one of {MODALITIES}")
    preset = preset or DEFAULT_FOR_MODALITY[modality]
    if preset in CT_WINDOWS:
        preset = f"ct_{preset}"
    if preset not in PRESETS:
        raise ConfigError(f"normalization: {preset!r} is not one of {PRESETS} (or a CT window name {tuple(CT_WINDOWS)})")
    return preset


@dataclass(frozen=True)
class IntensityRange:
    """The [low, high] interval mapped linearly onto [0, 255]; computed once per volume."""

    low: float
    high: float

    def apply(self, slice_: np.ndarray) -> np.ndarray:
        scale = 255.0 / max(self.high - self.low, 1e-12)
        out = (slice_.astype(np.float32, copy=False) - np.float32(self.low)) * np.float32(scale)
        return np.clip(out, 0, 255, out=out)


def sample_values(volume, axis: int, max_values: int = 1_000_000) -> np.ndarray:
    """A strided subsample of every slice, so percentiles of huge volumes need bounded memory."""
    shape = volume.shape
    n = shape[axis]
    per_slice = max(1, max_values // max(n, 1))
    plane = int(np.prod(shape)) // max(n, 1)
    stride = max(1, plane // per_slice)
    per_slice = -(-plane // stride)
    out = np.empty(n * per_slice, np.float32)
    for k in range(n):
        out[k * per_slice:(k + 1) * per_slice] = volume.get_slice(axis, k).ravel()[::stride]
    return out


def intensity_range(preset: str, values: np.ndarray) -> IntensityRange:
    """Window for a CT preset; per-volume percentiles or min/max (from `values`) otherwise."""
    if preset.startswith("ct_"):
        level, width = CT_WINDOWS[preset[3:]]
        return IntensityRange(level - width / 2, level + width / 2)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return IntensityRange(0.0, 1.0)
    if preset == "mr_percentile":
        low, high = np.percentile(finite, MR_PERCENTILES)
    else:
        low, high = float(finite.min()), float(finite.max())
    return IntensityRange(float(low), float(high))
