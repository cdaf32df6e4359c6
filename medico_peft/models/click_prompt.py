"""Corrective clicks written into the mask prompt ("click painting").

SAM takes corrective clicks as sparse point tokens and the previous answer as a dense mask prompt
(its low-res logits). A box-trained decoder such as LiteMedSAM's, finetuned for minutes, barely
reacts to the point tokens: on held-out Colin27 slices a corrective click changed the mask at the
clicked pixel in 2-7 % of cases and Dice fell with every click, while the fed-back mask was
followed closely. So the clicks also go where the decoder listens: before the previous logits are
fed back, a disk of `radius` mask pixels around every click so far is set to +`value` (positive
click) or -`value` (negative click). The point tokens are still given, so nothing SAM expects is
missing. Training paints exactly as evaluation and the Predictor do, so the decoder learns the
painted disks as certain evidence; `benchmarks/results/clicks.md` measures the effect.

Coordinates: points are (x, y) pixels of a frame that maps onto the mask grid by `scale`
(the S×S model input: scale = 4E / S; an original image of size h×w: scale = 4E / max(h, w)).
"""

from __future__ import annotations

import torch

CLICK_RADIUS = 5.0  # mask-grid pixels (the 4E×4E low-res grid: 256 for LiteMedSAM and SAM)
CLICK_VALUE = 10.0  # logit written into the disk (sigmoid(10) ≈ 1 - 4.5e-5)


def paint_clicks(mask_logits: torch.Tensor, points: torch.Tensor | None, labels: torch.Tensor | None,
                 scale: float = 1.0, radius: float = CLICK_RADIUS, value: float = CLICK_VALUE) -> torch.Tensor:
    """Return a copy of (K, 1, G, G) mask logits with a ±`value` disk around each click of each row.

    points (K, P, 2) xy and labels (K, P): 1 positive, 0 negative; any other label (−1 padding, 2/3 box
    corners) is skipped. Later clicks are painted over earlier ones. `radius` ≤ 0 returns the input.
    """
    if radius <= 0 or points is None or labels is None or points.shape[1] == 0:
        return mask_logits
    k, _, gh, gw = mask_logits.shape
    out = mask_logits.clone()
    ys = torch.arange(gh, dtype=torch.float32, device=out.device).view(1, gh, 1)
    xs = torch.arange(gw, dtype=torch.float32, device=out.device).view(1, 1, gw)
    pts = points.to(out.device, torch.float32) * scale
    labs = labels.to(out.device)
    for p in range(pts.shape[1]):  # a handful of clicks: loop over clicks, vectorised over rows
        cx = pts[:, p, 0].view(k, 1, 1)
        cy = pts[:, p, 1].view(k, 1, 1)
        disk = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius  # (K, G, G)
        lab = labs[:, p].view(k, 1, 1)
        pos = disk & (lab == 1)
        neg = disk & (lab == 0)
        plane = out[:, 0]
        plane.masked_fill_(pos, value)
        plane.masked_fill_(neg, -value)
    return out
