"""Per-class Dice of label maps: counts that add up over slices, ranks and volumes.

`class_counts(pred, target, C)` gives, per class, |P∩G|, |P| and |G| (int64); summing counts over a
data set and then `dice_from_counts` gives the pooled Dice per class, 2|P∩G| / (|P| + |G|), NaN for a
class absent from both prediction and reference. Pixels where `target` is negative are ignored.
"""

from __future__ import annotations

import math

import torch


def class_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(3, C) int64: intersection, predicted and reference pixel counts per class (any matching shapes)."""
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    inter = torch.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    p = torch.bincount(pred, minlength=num_classes)[:num_classes]
    g = torch.bincount(target, minlength=num_classes)[:num_classes]
    return torch.stack([inter, p, g]).to(torch.int64)


def dice_from_counts(counts) -> list[float]:
    """Dice per class from summed `class_counts`; NaN where a class has no predicted and no reference pixel."""
    out = []
    for inter, p, g in zip(*[list(map(float, row)) for row in counts]):
        out.append(math.nan if p + g == 0 else 2.0 * inter / (p + g))
    return out


def mean_foreground_dice(dice: list[float]) -> float:
    """Mean over classes 1..C-1 that are defined (NaN entries skipped); NaN if none is."""
    vals = [d for d in dice[1:] if not math.isnan(d)]
    return sum(vals) / len(vals) if vals else math.nan
