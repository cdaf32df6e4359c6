"""Segmentation losses per object and per output mask, computed in float32.

Every function takes logits (K, M, H, W) and a target (K, H, W) and returns (K, M), so the caller
can take the best of SAM's three multimask outputs before averaging (an ambiguous single point
must not be punished for picking a valid alternative interpretation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss 1 - 2|P·G| / (|P|² + |G|²) on sigmoid probabilities → (K, M)."""
    p = torch.sigmoid(logits.float()).flatten(2)
    g = target.float().flatten(1).unsqueeze(1)
    inter = (p * g).sum(-1)
    denom = (p * p).sum(-1) + (g * g).sum(-1)
    return 1.0 - (2 * inter + eps) / (denom + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    g = target.float().unsqueeze(1).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), g, reduction="none").flatten(2).mean(-1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (as in SAM's training), mean over pixels → (K, M)."""
    x = logits.float()
    g = target.float().unsqueeze(1).expand_as(x)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, g, reduction="none")
    p_t = p * g + (1 - p) * (1 - g)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * g + (1 - alpha) * (1 - g)) * loss
    return loss.flatten(2).mean(-1)


def true_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded output mask with the target → (K, M), no gradient (the IoU head's target)."""
    with torch.no_grad():
        p = (logits > 0).flatten(2)
        g = target.bool().flatten(1).unsqueeze(1)
        inter = (p & g).sum(-1).float()
        union = (p | g).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def mask_losses(logits: torch.Tensor, target: torch.Tensor, weights) -> torch.Tensor:
    """Weighted sum of the configured mask losses → (K, M). `weights` is a `LossConfig`."""
    total = torch.zeros(logits.shape[:2], device=logits.device)
    if weights.dice:
        total = total + weights.dice * dice_loss(logits, target)
    if weights.bce:
        total = total + weights.bce * bce_loss(logits, target)
    if weights.focal:
        total = total + weights.focal * focal_loss(logits, target, weights.focal_gamma)
    return total
