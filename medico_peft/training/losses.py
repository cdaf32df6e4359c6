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


def click_disks(points: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], radius: float) -> torch.Tensor:
    """(K, H, W) bool: the pixels within `radius` of any click (label 0 or 1; padding and box corners skipped)
    of each row; points (K, P, 2) xy in the same pixel frame."""
    h, w = size
    ys = torch.arange(h, device=points.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=points.device, dtype=torch.float32).view(1, 1, 1, w)
    px = points[..., 0].float().view(*points.shape[:2], 1, 1)
    py = points[..., 1].float().view(*points.shape[:2], 1, 1)
    near = (xs - px) ** 2 + (ys - py) ** 2 <= max(float(radius), 0.5) ** 2  # (K, P, H, W)
    clicked = ((labels == 0) | (labels == 1)).view(*labels.shape, 1, 1)
    return (near & clicked).any(dim=1)


def click_bce_loss(logits: torch.Tensor, target: torch.Tensor, disks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the truth, averaged over each row's click-disk pixels → (K, M); 0 for a row
    without clicks. logits (K, M, H, W), target and disks (K, H, W)."""
    g = target.float().unsqueeze(1).expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits.float(), g, reduction="none")
    d = disks.float().unsqueeze(1)
    return (ce * d).flatten(2).sum(-1) / d.flatten(2).sum(-1).clamp_min(1.0)


def click_keep_loss(logits: torch.Tensor, target: torch.Tensor, prev: torch.Tensor,
                    regions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the truth summed over the pixels a click round broke, divided by the size of the
    error regions its clicks landed in → (K, M); 0 for a row whose clicks landed in no error region.

    Broken: right in `prev` (the answer the clicks corrected) and wrong in this output (chosen without gradient,
    like a hard-example mask). With `loss.click_region` at the same weight a broken pixel costs as much as a
    clicked error pixel left unfixed. logits (K, M, H, W); target, prev and regions (K, H, W) bool."""
    g = target.float().unsqueeze(1).expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits.float(), g, reduction="none")
    with torch.no_grad():
        broken = ((logits > 0) != target.bool().unsqueeze(1)) & (prev.bool() == target.bool()).unsqueeze(1)
        size = regions.flatten(1).sum(-1).float().unsqueeze(1)  # (K, 1)
    return (ce * broken).flatten(2).sum(-1) / size.clamp_min(1.0) * (size > 0)


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


def semantic_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0,
                  class_weights: torch.Tensor | None = None, smooth: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy (optionally class-weighted) + soft multi-class Dice on (B, C, H, W) logits, (B, H, W) targets.

    Dice is pooled over the batch per foreground class (1..C-1), 1 - (2Σpg + s) / (Σp + Σg + s), and
    averaged over those classes; background is left to the cross-entropy. Returns (loss, parts).
    """
    x = logits.float()
    target = target.long()
    total = x.new_zeros(())
    parts = {}
    if ce_weight:
        w = None if class_weights is None else class_weights.to(x.device, torch.float32)
        ce = F.cross_entropy(x, target, weight=w)
        total = total + ce_weight * ce
        parts["ce"] = float(ce.detach())
    if dice_weight:
        probs = x.softmax(dim=1)[:, 1:]
        onehot = F.one_hot(target.clamp_min(0), x.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        dice = 1.0 - (2 * inter + smooth) / (denom + smooth)
        dl = dice.mean()
        total = total + dice_weight * dl
        parts["dice_loss"] = float(dl.detach())
    return total, parts
