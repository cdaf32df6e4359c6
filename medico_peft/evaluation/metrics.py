"""Segmentation metrics shared by validation during training and by `medico-peft evaluate`."""

from __future__ import annotations

import torch


def dice_per_object(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice = 2|P∩G| / (|P|+|G|) for each of K objects; (K, H, W) bool/0-1 inputs → (K,) floats.

    Two empty masks count as a perfect match (1.0), an empty prediction of a non-empty object as 0.
    """
    p = pred.flatten(1).float()
    g = gt.flatten(1).float()
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    dice = (2 * inter) / total.clamp_min(eps)
    return torch.where(total > 0, dice, torch.ones_like(dice))


def iou_per_object(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Intersection over union per object, the target of SAM's IoU head."""
    p = pred.flatten(1).float()
    g = gt.flatten(1).float()
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(eps), torch.ones_like(inter))
