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

Accepting a click locally ("click merge"): after a click the decoder re-predicts the whole mask,
and a decoder finetuned for minutes drifts far from the click as often as it fixes the clicked
region: on the demo's held-out MNI152 slices a LoRA model's Dice went 0.671 -> 0.657 over 4
clicks, while replacing only the clicked error region with the truth would reach 0.909. So the
new answer is accepted only where the click asked for a change (`merge_click`): a positive click
takes the pixels the new answer *adds* in the connected regions touching the click's disk, a
negative click the pixels it *removes* there; everything else keeps the previous answer. This is
the "progressive merge" idea of FocalClick (Chen et al., CVPR 2022); `benchmarks/bench_clicks.py`
measures it against the raw decoder output. Training feeds back the raw output (it teaches the
decoder; the merge is how an answer is accepted at inference).

Coordinates: points are (x, y) pixels of a frame that maps onto the mask grid by `scale`
(the S×S model input: scale = 4E / S; an original image of size h×w: scale = 4E / max(h, w)).
"""

from __future__ import annotations

import numpy as np
import torch

CLICK_RADIUS = 5.0  # mask-grid pixels (the 4E×4E low-res grid: 256 for LiteMedSAM and SAM)
CLICK_VALUE = 10.0  # logit written into the disk (sigmoid(10) ≈ 1 - 4.5e-5)
CLICK_MERGES = ("local", "near", "none")  # how a click's new answer is accepted (`merge_click`, `merge_reach`)
CLICK_MERGE = "local"
NEAR_RADII = 3.0  # a negative click's accepted removal ("local", "near") and a positive's addition ("near") stay
#                   within this many click radii of the click
MAX_NEGATIVE_SHARE = 0.5  # a negative click's region may remove at most this share of the previous answer...
SMALL_ANSWER_RADII = 4.0  # ...unless it is no larger than a disk of this many click radii (a small cross-section)


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


def merge_reach(click_merge: str, radius: float = CLICK_RADIUS) -> tuple[float | None, float | None]:
    """`merge_click`'s (reach, negative_reach) for a `click_merge` mode, in grid pixels (None: unbounded).

    "local" (the default): a positive click's addition is unbounded (the whole connected regions touching the
    click), a negative click's removal stays within `NEAR_RADII` click radii. "near": both bounded. "none":
    `accept_click` does not merge at all. With `radius` 0 (clicks sent as points only) the bound is in default
    click radii (`CLICK_RADIUS`).

    Why removals are bounded and additions are not: Dice punishes a wrong removal more than a wrong addition. At
    Dice D, removing one false-positive pixel gains about D / (|P| + |G|), removing a true pixel loses about
    (2 - D) / (|P| + |G|); so at D = 0.6 a removal must be right in more than 70 % of its pixels to help, an
    addition in more than 30 %. On MNI152 grey/white matter a click-trained LoRA's unbounded removals were right
    in 73 % of their pixels and its clicks lost Dice; bounded to 3 radii, in 88 % on the val slab, where its clicks
    then gained (on the test slab they no longer lose: benchmarks/results/clicks.md). On thin,
    convoluted structures the pixels a decoder removes form one band far beyond the clicked error."""
    near = NEAR_RADII * (float(radius) if radius > 0 else CLICK_RADIUS)  # radius 0 (clicks not painted): the default
    if click_merge == "near":
        return near, near
    if click_merge == "local":
        return None, near
    return None, None


def accept_click(click_merge: str, prev_logits: torch.Tensor, new_logits: torch.Tensor, points: torch.Tensor | None,
                 labels: torch.Tensor | None, scale: float = 1.0, radius: float = CLICK_RADIUS,
                 boxes: torch.Tensor | None = None) -> torch.Tensor:
    """The answer kept after a click round under a `click_merge` mode (one of CLICK_MERGES): "none" keeps the
    decoder's whole new answer; "local" and "near" keep it only where the click asked for a change (`merge_click`
    with `merge_reach`'s bound). The one place evaluation, validation and the Predictor apply the mode."""
    if click_merge == "none":
        return new_logits
    reach, negative_reach = merge_reach(click_merge, radius)
    return merge_click(prev_logits, new_logits, points, labels, scale=scale, radius=radius, boxes=boxes,
                       reach=reach, negative_reach=negative_reach)


def merge_click(prev_logits: torch.Tensor, new_logits: torch.Tensor, points: torch.Tensor | None,
                labels: torch.Tensor | None, scale: float = 1.0, radius: float = CLICK_RADIUS,
                boxes: torch.Tensor | None = None, reach: float | None = None,
                negative_reach: float | None = None) -> torch.Tensor:
    """Accept a click's new answer only where the click asked for a change; (K, M, G, G) logits out.

    prev_logits: (K, 1, G, G) or (K, M, G, G) low-res logits of the answer before the click; new_logits
    (K, M, G, G) the decoder's answer with the click; points (K, P, 2) xy / labels (K, P) the clicks of
    this round (1 positive, 0 negative; any other label is skipped). For each row and output, the
    changed pixels of the click's kind (added for positive, removed for negative) form connected
    regions (8-connectivity on the mask grid); those that touch the click's disk (`radius` grid pixels,
    at least the clicked pixel) take the new logits, all other pixels keep the previous ones. A row
    without a click this round keeps its previous answer. `boxes` (K, 4) xyxy, same frame as the points:
    the object's box prompt; a positive click adds nothing outside it (the box says where the object is;
    without this a model that floods the background after a click would add the whole background). A
    negative click whose region would remove more than `MAX_NEGATIVE_SHARE` of the previous answer and more
    than a disk of `SMALL_ANSWER_RADII` click radii (a collapse: zero-shot LiteMedSAM often returns an almost
    empty mask after a negative click on a large object) removes only the changed pixels of its own disk; a
    small answer (the end of a structure in a volume) can be removed whole. `reach` / `negative_reach` (grid
    pixels): the pixels a positive / negative click accepts also lie within this distance of the click
    (`merge_reach` gives them per mode); None: no bound.
    """
    from scipy.ndimage import label as connected_regions

    k, m, gh, gw = new_logits.shape
    prev = prev_logits.to(new_logits.dtype).expand(k, m, gh, gw)
    if points is None or labels is None or points.shape[1] == 0:
        return prev.clone()
    prev_on = (prev > 0).cpu().numpy()
    new_on = (new_logits > 0).cpu().numpy()
    take = np.zeros((k, m, gh, gw), dtype=bool)
    ys, xs = np.mgrid[0:gh, 0:gw]
    r2 = max(float(radius), 0.5) ** 2
    pts = points.detach().cpu().to(torch.float32).numpy() * scale
    labs = labels.detach().cpu().numpy()
    structure = np.ones((3, 3), dtype=bool)
    small = np.pi * (SMALL_ANSWER_RADII * max(float(radius), 0.5)) ** 2  # a removal this small is always taken
    inside = np.ones((k, gh, gw), dtype=bool)
    if boxes is not None:
        b = boxes.detach().cpu().to(torch.float32).numpy().reshape(k, 4) * scale
        inside = ((xs[None] >= np.floor(b[:, 0, None, None])) & (xs[None] <= np.ceil(b[:, 2, None, None]))
                  & (ys[None] >= np.floor(b[:, 1, None, None])) & (ys[None] <= np.ceil(b[:, 3, None, None])))
    for row in range(k):
        for p in range(pts.shape[1]):
            lab = int(labs[row, p])
            if lab not in (0, 1):
                continue
            cx, cy = pts[row, p]
            disk = (xs - cx) ** 2 + (ys - cy) ** 2 <= r2
            if not disk.any():  # a click off the grid: its own pixel, clamped
                disk[min(max(int(round(cy)), 0), gh - 1), min(max(int(round(cx)), 0), gw - 1)] = True
            for out in range(m):
                if lab == 1:
                    changed = new_on[row, out] & ~prev_on[row, out] & inside[row]
                else:
                    changed = prev_on[row, out] & ~new_on[row, out]
                regions, _ = connected_regions(changed, structure=structure)
                hit = np.unique(regions[disk & changed])
                if not hit.size:
                    continue
                region = np.isin(regions, hit)
                bound = reach if lab == 1 else negative_reach
                if bound is not None:
                    region &= (xs - cx) ** 2 + (ys - cy) ** 2 <= max(float(bound), 0.5) ** 2
                if lab == 0 and region.sum() > max(MAX_NEGATIVE_SHARE * prev_on[row, out].sum(), small):
                    region = disk & changed  # the answer collapsed: a negative click removes its own disk only
                take[row, out] |= region
    sel = torch.from_numpy(take).to(new_logits.device)
    return torch.where(sel, new_logits, prev)
