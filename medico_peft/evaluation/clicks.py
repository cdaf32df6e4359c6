"""Simulated corrective clicks: where a user would click next, given the current mask and the truth.

Used by the trainer (random points in the error regions, one positive from the false negatives and
one negative from the false positives per sub-iteration, as in MedicoSAM / micro-sam) and by the
evaluator and the trainer's validation (one deterministic click per iteration, `center_correction`).

Evaluation protocol: the click goes to the pixel farthest from any edge of an error region (the
maximum of the distance transform), in whichever of the false-negative and false-positive regions
reaches deeper — the error a person sees as the widest mistake and clicks into the middle of. This
is the "largest error" rule of the interactive-segmentation benchmarks (RITM/NoC style), with size
measured as depth, not pixel count: a thin sliver along a long border has many pixels but cannot be
clicked into, and a depth criterion never puts a click on a one-pixel-wide band.

Coordinates are (x, y) = (column, row) pixels; label 1 = positive, 0 = negative, -1 = no point
(SAM's prompt encoder turns -1 into its "not a point" embedding, so it is ignored).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.prompts import deepest_pixel


# training's corrective clicks: `random_corrections`, `interior_corrections` (two random clicks per sub-iteration)
# or `center_corrections` (one click per sub-iteration, placed exactly as the evaluation protocol places it)
CLICK_SAMPLINGS = ("uniform", "interior", "center")


def _random_pixel(region: torch.Tensor, generator: torch.Generator | None):
    """One uniformly random pixel of each (K, H, W) region; `found` is False where a region is empty."""
    k, h, w = region.shape
    flat = region.reshape(k, h * w).float()
    found = flat.sum(1) > 0
    weights = torch.where(found[:, None], flat, torch.ones_like(flat))
    idx = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    xy = torch.stack([idx % w, idx // w], dim=1).to(torch.float32)
    return xy, found


def random_corrections(pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator | None = None):
    """One positive point in each object's false negatives and one negative in its false positives.

    pred, gt: (K, H, W) bool. Returns points (K, 2, 2) and labels (K, 2) with -1 where an error region is empty.
    """
    pred = pred.bool()
    gt = gt.bool()
    pos_xy, pos_ok = _random_pixel(gt & ~pred, generator)
    neg_xy, neg_ok = _random_pixel(pred & ~gt, generator)
    points = torch.stack([pos_xy, neg_xy], dim=1)
    ones = torch.ones_like(pos_ok, dtype=torch.long)
    labels = torch.stack([torch.where(pos_ok, ones, -ones), torch.where(neg_ok, 0 * ones, -ones)], dim=1)
    return points, labels


def _interior(region: torch.Tensor, depth: float) -> torch.Tensor:
    """The pixels of each (K, H, W) region at least `depth` from its outside (the image border counts as
    outside), or its deepest pixels where the region is shallower; empty regions stay empty."""
    from scipy.ndimage import distance_transform_edt

    out = torch.zeros_like(region)
    for j, r in enumerate(region.cpu().numpy()):
        if not r.any():
            continue
        dist = distance_transform_edt(np.pad(r, 1))[1:-1, 1:-1]
        out[j] = torch.from_numpy(dist >= min(float(depth), float(dist.max())))
    return out


def interior_corrections(pred: torch.Tensor, gt: torch.Tensor, depth: float,
                         generator: torch.Generator | None = None):
    """`random_corrections` drawn only from the interior of the error regions: pixels at least `depth` from
    the region's edge (the deepest pixels where no pixel is that deep). With `depth` = the painted click
    radius the painted disk lies inside the error it corrects, as it does for a click at the centre of an
    error; a uniform pixel of a thin boundary band paints a disk that is half wrong, which teaches the
    decoder to distrust painted clicks."""
    pred = pred.bool()
    gt = gt.bool()
    pos_xy, pos_ok = _random_pixel(_interior(gt & ~pred, depth), generator)
    neg_xy, neg_ok = _random_pixel(_interior(pred & ~gt, depth), generator)
    points = torch.stack([pos_xy, neg_xy], dim=1)
    ones = torch.ones_like(pos_ok, dtype=torch.long)
    labels = torch.stack([torch.where(pos_ok, ones, -ones), torch.where(neg_ok, 0 * ones, -ones)], dim=1)
    return points, labels


def _deepest_pixel(region: np.ndarray):
    """Pixel farthest from the region's border and its distance (0 if the region is empty)."""
    if not region.any():
        return None, 0.0
    y, x, dist = deepest_pixel(region)  # the image border counts as outside the error region
    return (float(x), float(y)), dist


def center_corrections(pred: torch.Tensor, gt: torch.Tensor):
    """`center_correction` for each of K objects: points (K, 1, 2) xy and labels (K, 1), −1 where perfect."""
    pred_np = pred.bool().cpu().numpy()
    gt_np = gt.bool().cpu().numpy()
    k = pred_np.shape[0]
    points = torch.zeros((k, 1, 2), dtype=torch.float32)
    labels = torch.full((k, 1), -1, dtype=torch.long)
    for j in range(k):
        click = center_correction(pred_np[j], gt_np[j])
        if click is not None:
            points[j, 0] = torch.tensor(click[0])
            labels[j, 0] = click[1]
    return points, labels


def center_correction(pred: np.ndarray, gt: np.ndarray):
    """The next click for one object: centre of the false-negative or false-positive region, whichever is deeper.

    Returns ((x, y), label) or None when the prediction is already perfect.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    fn_xy, fn_d = _deepest_pixel(gt & ~pred)
    fp_xy, fp_d = _deepest_pixel(pred & ~gt)
    if fn_xy is None and fp_xy is None:
        return None
    if fn_d >= fp_d:
        return fn_xy, 1
    return fp_xy, 0


def clicked_regions(pred, gt, points, labels) -> np.ndarray:
    """(K, H, W) bool: for each object the connected error regions its clicks landed in: false negatives
    for a positive click, false positives for a negative one (8-connectivity); what one perfect local click
    would fix. pred, gt (K, H, W) bool; points (K, P, 2) xy and labels (K, P) in the masks' pixel frame
    (labels other than 0/1 are skipped; a click on a right pixel adds nothing)."""
    from scipy.ndimage import label as connected_regions

    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    points = np.asarray(points, dtype=np.float64).reshape(len(gt), -1, 2)
    labels = np.asarray(labels).reshape(len(gt), -1)
    out = np.zeros_like(gt)
    structure = np.ones((3, 3), dtype=bool)
    for j in range(len(gt)):
        h, w = gt[j].shape
        for (x, y), lab in zip(points[j], labels[j]):
            if lab not in (0, 1):
                continue
            error = (gt[j] & ~pred[j]) if lab == 1 else (pred[j] & ~gt[j])
            x, y = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
            if error[y, x]:
                regions, _ = connected_regions(error, structure=structure)
                out[j] |= regions == regions[y, x]
    return out


def click_response(prev: np.ndarray, raw: np.ndarray, kept: np.ndarray, gt: np.ndarray, xy, label) -> list[dict | None]:
    """How one corrective round answered each object's click: the diagnosis of "clicks do not help".

    prev / raw / kept / gt: (K, H, W) bool masks at one resolution: the answer before the click, the
    decoder's whole answer with the click, the answer kept after the click merge, and the truth. xy (K, 1, 2)
    and label (K, 1): the round's click in the same frame (label -1: no click). Per object a dict (None where
    there was no click): `kind` positive/negative; `error_px` all wrong pixels before the click;
    `region_px` the connected error region the click is in (false negatives for a positive click, false
    positives for a negative one; 8-connectivity): what one perfect local click would fix; `fixed_raw` /
    `fixed_kept` the pixels of that region the decoder's answer / the kept answer gets right; `broken_raw` /
    `broken_kept` pixels outside it that were right and are wrong afterwards; `dice_before`, `dice_raw`,
    `dice_kept`.
    """
    from .metrics import dice_per_object

    prev, raw, kept, gt = (np.asarray(a, dtype=bool) for a in (prev, raw, kept, gt))
    xy = np.asarray(xy, dtype=np.float64).reshape(len(gt), -1, 2)[:, -1:]
    label = np.asarray(label).reshape(len(gt), -1)[:, -1:]
    dice = {name: dice_per_object(torch.from_numpy(m), torch.from_numpy(gt)).numpy()
            for name, m in (("before", prev), ("raw", raw), ("kept", kept))}
    regions = clicked_regions(prev, gt, xy, label)
    out: list[dict | None] = []
    for j in range(len(gt)):
        if label[j, 0] not in (0, 1):
            out.append(None)
            continue
        region = regions[j]
        right_before = prev[j] == gt[j]
        row = {"kind": "positive" if label[j, 0] == 1 else "negative", "error_px": int((~right_before).sum()),
               "region_px": int(region.sum())}
        for name, answer in (("raw", raw[j]), ("kept", kept[j])):
            right = answer == gt[j]
            row[f"fixed_{name}"] = int((right & region).sum())
            row[f"broken_{name}"] = int((right_before & ~right & ~region).sum())
        row.update({f"dice_{name}": float(values[j]) for name, values in dice.items()})
        out.append(row)
    return out
