"""Train/val/test assignment. Volumes are split whole (no slice of a test patient is ever trained
on); a single-subject volume can instead be split into slabs along the slicing axis with a gap,
so neighbouring, nearly identical slices never straddle train and test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..utils.config import check_fields, field_prefix, option

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    train: float = option(min=0.0, max=1.0, help="share of volumes for training")
    val: float = option(min=0.0, max=1.0, help="share of volumes for validation")
    test: float = option(min=0.0, max=1.0, help="share of volumes for testing")

    def __post_init__(self):
        with field_prefix("split_fractions"):
            check_fields(self)
        if self.train + self.val + self.test > 1.0 + 1e-9:
            raise ConfigError(f"split_fractions: train+val+test = {self.train + self.val + self.test:.3f} exceeds 1")

    @classmethod
    def parse(cls, value) -> "SplitFractions":
        if isinstance(value, SplitFractions):
            return value
        if isinstance(value, str):
            value = [float(v) for v in value.split(",")]
        if isinstance(value, dict):
            return cls(**{k: float(v) for k, v in value.items()})
        if len(value) != 3:
            raise ConfigError(f"split_fractions: expected three numbers train,val,test, got {value!r}")
        return cls(*(float(v) for v in value))


def split_volumes(volume_ids: list[str], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Seeded shuffle of whole volumes. With >= 3 volumes every split with a non-zero share gets one."""
    order = sorted(volume_ids)
    np.random.default_rng(seed).shuffle(order)
    n = len(order)
    counts = {name: int(round(getattr(fractions, name) * n)) for name in ("val", "test")}
    if n >= 3:
        for name in counts:
            if getattr(fractions, name) > 0:
                counts[name] = max(1, counts[name])
    n_test = min(counts["test"], n)
    n_val = min(counts["val"], n - n_test)
    assignment = {}
    for i, vid in enumerate(order):
        assignment[vid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def slab_split(foreground: list[int], fractions: SplitFractions, gap: int) -> dict[int, str]:
    """Assign slice positions inside the foreground extent [first, last] to train (lowest part),
    val (next, after a gap) and test (highest part); slices in the gaps belong to no split.
    When the extent is too short for fractions + gaps, the largest part gives up slices."""
    if not foreground:
        return {}
    lo, hi = min(foreground), max(foreground)
    length = hi - lo + 1
    sizes = {name: int(getattr(fractions, name) * length) for name in SPLIT_NAMES}
    used = [n for n in SPLIT_NAMES if sizes[n] > 0]
    deficit = sum(sizes.values()) + gap * max(len(used) - 1, 0) - length
    while deficit > 0:  # small extent: the gap wins; shrink the largest part one slice at a time
        largest = max(used, key=lambda n: sizes[n])
        if sizes[largest] <= 1:
            raise ConfigError(
                f"slab split: fractions {fractions} with gap {gap} do not fit the foreground extent "
                f"of {length} slices ({lo}..{hi})"
            )
        sizes[largest] -= 1
        deficit -= 1
    assignment: dict[int, str] = {}
    for k in range(lo, lo + sizes["train"]):
        assignment[k] = "train"
    start = lo + sizes["train"] + (gap if sizes["train"] else 0)
    for k in range(start, start + sizes["val"]):
        assignment[k] = "val"
    for k in range(hi - sizes["test"] + 1, hi + 1):
        assignment[k] = "test"
    return assignment
