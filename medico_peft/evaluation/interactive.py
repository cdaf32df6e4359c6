"""MedicoSAM's interactive segmentation protocol: a start prompt, then corrective clicks.

Per object: start from one tight box (single-mask output) or one positive point at the object's
centre (the maximum of its distance transform; multimask output, keep the mask with the highest
predicted IoU). Then `n_clicks` times: one click at the centre of the deeper error region
(`center_correction`), added to all previous points, with the previous low-res logits fed back
as mask input; the click's answer is accepted locally (`merge_click`: only the change the click asked
for, in the regions touching it; `click_merge="none"` takes the decoder's whole answer). Dice is measured after every step, at the model input resolution (S×S, cropped to
the non-padded content), which is where the labels live in the shards.

All objects of a slice are decoded together against one image embedding, so an image is encoded
once per slice whatever the number of objects and clicks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.prompts import deepest_pixel, mask_box
from ..errors import ConfigError
from ..models.postprocess import upscale_logits
from ..models.click_prompt import CLICK_MERGE, CLICK_MERGES, CLICK_RADIUS, accept_click, paint_clicks
from .clicks import center_corrections, click_response
from .metrics import dice_per_object
from .segmenter import Segmenter, as_segmenter

STARTS = ("box", "point")


def object_center(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel deepest inside the mask: a click in its middle, even for a ring or a C shape."""
    y, x, _ = deepest_pixel(mask)
    return float(x), float(y)


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Inclusive xyxy box around the mask (the box a reader draws exactly around the object)."""
    box = mask_box(mask)
    if box is None:
        raise ValueError("empty mask has no box")
    return tuple(float(v) for v in box)


def logits_to_masks(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """(K, 1, h, w) low-res logits → (K, H, W) bool masks at the S×S input, cropped to the content."""
    return upscale_logits(low_res, img_size, input_size)[:, 0] > 0


@dataclass
class SliceTrace:
    """Everything one slice's protocol produced: Dice per object per step and the prompts used."""

    dice: np.ndarray  # (K, n_clicks + 1)
    start_masks: np.ndarray  # (K, H, W) bool
    final_masks: np.ndarray  # (K, H, W) bool
    points: np.ndarray  # (K, P, 2) xy of all clicks (start point included for start="point")
    point_labels: np.ndarray  # (K, P) 1/0/-1
    boxes: np.ndarray | None  # (K, 4) for start="box"


def embed_image(segmenter: Segmenter, image: torch.Tensor, input_size: tuple[int, int]):
    """The segmenter's embeddings of one image (with its content size where the segmenter takes it)."""
    if getattr(segmenter, "embed_takes_input_size", False):
        return segmenter.embed(image, input_size=input_size)
    return segmenter.embed(image)


def run_protocol(segmenter: Segmenter, image: torch.Tensor, gt: np.ndarray, input_size: tuple[int, int],
                 start: str = "box", n_clicks: int = 7, use_mask_input: bool = True,
                 click_radius: float = CLICK_RADIUS, click_merge: str = CLICK_MERGE,
                 embeddings=None, on_click=None) -> SliceTrace:
    """Run the protocol for K objects of one image; gt is (K, H, W) bool at the cropped input size.

    The fed-back logits carry every click so far painted in (`click_radius`, models/click_prompt.py,
    as in training and the Predictor; 0 = points only). `use_mask_input=False` drops the fed-back
    logits (a diagnostic: box-only models such as zero-shot LiteMedSAM never saw mask inputs).
    `embeddings`: the image's `embed_image` result when the caller already has it (one encoder
    pass for every object batch of a slice). `on_click(round, before, raw, kept, xy, label)`: called after
    every corrective round with (K, H, W) bool masks (the answer before the click, the decoder's whole
    answer, the answer kept after the click merge) and the round's clicks (xy (K, 1, 2), label (K, 1)).
    """
    if start not in STARTS:
        raise ConfigError(f"start: {start!r} should be one of {', '.join(STARTS)}")
    check_click_merge(click_merge)
    k = gt.shape[0]
    gt_t = torch.from_numpy(gt)
    emb = embed_image(segmenter, image, input_size) if embeddings is None else embeddings
    size = segmenter.img_size

    points = torch.zeros((k, 0, 2), dtype=torch.float32)
    labels = torch.zeros((k, 0), dtype=torch.long)
    boxes = None
    if start == "box":
        boxes = torch.tensor([tight_box(m) for m in gt], dtype=torch.float32)
        low, _ = segmenter.predict(emb, None, None, boxes, None, False)
    else:
        points = torch.tensor([[object_center(m)] for m in gt], dtype=torch.float32)
        labels = torch.ones((k, 1), dtype=torch.long)
        low, iou = segmenter.predict(emb, points, labels, None, None, True)
        best = iou.argmax(dim=1)
        low = low[torch.arange(k), best].unsqueeze(1)
    low = low[:, :1]
    masks = logits_to_masks(low, size, input_size)
    dice = [dice_per_object(masks, gt_t).numpy()]
    start_masks = masks.numpy().copy()

    for _ in range(n_clicks):
        new_xy, new_label = center_corrections(masks, gt_t)  # label -1: already perfect, no click
        points = torch.cat([points, new_xy], dim=1)
        labels = torch.cat([labels, new_label], dim=1)
        mask_input = None
        if use_mask_input:
            mask_input = paint_clicks(low, points, labels, scale=low.shape[-1] / size, radius=click_radius)
        new_low, _ = segmenter.predict(emb, points, labels, boxes, mask_input, False)
        new_low = new_low[:, :1]
        low = accept_click(click_merge, low, new_low, new_xy, new_label, scale=low.shape[-1] / size,
                           radius=click_radius, boxes=boxes)
        before, masks = masks, logits_to_masks(low, size, input_size)
        if on_click is not None:
            on_click(len(dice) - 1, before, logits_to_masks(new_low, size, input_size), masks, new_xy, new_label)
        dice.append(dice_per_object(masks, gt_t).numpy())

    return SliceTrace(np.stack(dice, axis=1), start_masks, masks.numpy(), points.numpy(), labels.numpy(),
                      None if boxes is None else boxes.numpy())


def check_click_merge(click_merge: str) -> None:
    if click_merge not in CLICK_MERGES:
        raise ConfigError(f"click_merge: {click_merge!r} should be one of {', '.join(CLICK_MERGES)}")


@dataclass
class OverlayCase:
    """One object kept for an overlay figure (image crop, truth, start and final predictions)."""

    title: str
    image: np.ndarray  # (H, W) float
    gt: np.ndarray
    start_mask: np.ndarray
    final_mask: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    dice_start: float
    dice_final: float


@dataclass
class EvalResult:
    """Dice per step (0 = start prompt, i = after i clicks): overall, per label, and per object rows."""

    start: str
    n_clicks: int
    split: str
    mean_dice: list[float]
    per_label: dict[str, list[float]]
    label_counts: dict[str, int]
    rows: list[dict]
    n_slices: int
    seconds: float
    cases: list[OverlayCase] = field(default_factory=list, repr=False)
    click_rows: list[dict] = field(default_factory=list, repr=False)  # `click_response` of every click
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        """JSON-ready summary (rows and overlay pixels left out; they live in per_object.csv / PNGs)."""
        return {"start": self.start, "n_clicks": self.n_clicks, "split": self.split,
                "mean_dice": self.mean_dice, "per_label": self.per_label, "label_counts": self.label_counts,
                "n_slices": self.n_slices, "n_objects": self.n_objects, "seconds": round(self.seconds, 2),
                "files": {k: str(v) for k, v in self.files.items()}}


def resolve_labels(labels: Sequence[int | str] | None, label_names: dict[int, str], where: str) -> list[int] | None:
    """Label ids from ids, names or shell-style globs ("Precentral_*"); ConfigError names what matched nothing."""
    if labels is None or len(labels) == 0:
        return None
    ids: set[int] = set()
    for item in labels:
        text = str(item).strip()
        if text.isdigit():
            if int(text) not in label_names:
                raise ConfigError(f"labels: id {text} is not in {where} (ids {min(label_names)}..{max(label_names)})")
            ids.add(int(text))
            continue
        hits = [i for i, name in label_names.items() if fnmatch.fnmatchcase(name.lower(), text.lower())]
        if not hits:
            raise ConfigError(f"labels: {text!r} matches no label name in {where}")
        ids.update(hits)
    return sorted(ids)


def _count_slices(manifest, split: str) -> int:
    """Upper bound for the progress bar (slices without a selected object are skipped)."""
    return sum(entry.n_samples for entry in manifest.shards_for(split))


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_interactive(model, manifest, split: str = "test", start: str = "box", n_clicks: int = 7,
                         out_dir=None, max_slices: int | None = None, labels: Sequence[int | str] | None = None,
                         n_overlays: int = 4, max_objects_per_batch: int = 16, progress: bool = True,
                         title: str | None = None, use_mask_input: bool = True,
                         click_radius: float = CLICK_RADIUS, click_merge: str = CLICK_MERGE) -> EvalResult:
    """Score a model (a `MedSam`, or any `Segmenter`) with the interactive protocol on one split.

    With `out_dir`, writes per_object.csv, summary.md, summary.json, dice_vs_clicks.png and
    overlay PNGs there. `max_slices` takes N eligible slices evenly spaced over the split (in shard
    order), so a subset spans the whole held-out slab and two models evaluated with the same
    arguments see exactly the same objects.

    Phases: validate the arguments, choose the slices, run the protocol on them, aggregate, write.
    """
    loaded, label_ids, segmenter = _validate_args(model, manifest, start, n_clicks, max_slices, labels)
    check_click_merge(click_merge)
    click_rule = {"use_mask_input": use_mask_input, "click_radius": click_radius, "click_merge": click_merge}
    with _eval_mode(model):
        started = time.perf_counter()
        chosen, total = _choose_slices(loaded, manifest, split, label_ids, max_slices)
        rows, click_rows, cases, n_slices = _run_slices(segmenter, manifest, split, label_ids, chosen, total, start,
                                                        n_clicks, n_overlays, max_objects_per_batch, progress,
                                                        click_rule)
    result = _aggregate(rows, cases, n_slices, start, n_clicks, split, time.perf_counter() - started)
    result.click_rows = click_rows
    if out_dir is not None:
        from .report import write_eval_outputs

        write_eval_outputs(result, out_dir, title=title)
    return result


def _validate_args(model, manifest, start: str, n_clicks: int, max_slices: int | None, labels):
    """Check the arguments against each other and the data; returns (manifest, label ids, segmenter)."""
    from ..data.manifest import load_manifest

    if start not in STARTS:
        raise ConfigError(f"start: {start!r} should be one of {', '.join(STARTS)}")
    if not isinstance(n_clicks, int) or n_clicks < 0:
        raise ConfigError(f"clicks: {n_clicks!r} should be an int >= 0")
    if max_slices is not None and max_slices < 1:
        raise ConfigError(f"max_slices: {max_slices!r} should be >= 1")
    loaded = load_manifest(manifest)
    label_ids = resolve_labels(labels, loaded.label_names, str(manifest))
    segmenter = as_segmenter(model)
    if segmenter.img_size != loaded.image_size:
        raise ConfigError(f"{manifest}: shards are {loaded.image_size}² but the model takes "
                          f"{segmenter.img_size}² input; convert the data with --size {segmenter.img_size}")
    return loaded, label_ids, segmenter


@contextlib.contextmanager
def _eval_mode(model):
    """An nn.Module model in eval mode for the duration, its training flag restored afterwards."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


def _choose_slices(loaded, manifest, split: str, label_ids, max_slices: int | None) -> tuple[set[int] | None, int]:
    """(positions of the chosen eligible slices or None for all, progress total)."""
    from ..data.dataset import iter_eval_slices

    if max_slices is None:
        return None, _count_slices(loaded, split)
    eligible = sum(1 for _ in iter_eval_slices(manifest, split=split, label_ids=label_ids, verify=False))
    chosen = set(np.linspace(0, eligible - 1, min(max_slices, eligible)).round().astype(int).tolist())
    return chosen, len(chosen)


def _run_slices(segmenter, manifest, split: str, label_ids, chosen, total: int, start: str, n_clicks: int,
                n_overlays: int, max_objects_per_batch: int, progress: bool,
                click_rule: dict) -> tuple[list[dict], list[dict], list[OverlayCase], int]:
    """The protocol on every chosen slice: per-object rows, per-click rows, overlay cases, slices scored.
    `click_rule`: run_protocol's use_mask_input / click_radius / click_merge."""
    from tqdm.auto import tqdm

    from ..data.dataset import iter_eval_slices

    rows: list[dict] = []
    click_rows: list[dict] = []
    cases: list[OverlayCase] = []
    n_slices = 0
    bar = tqdm(total=total, desc=f"evaluate {split} ({start} + {n_clicks} clicks)", unit="slice",
               disable=not progress)
    try:
        for position, item in enumerate(iter_eval_slices(manifest, split=split, label_ids=label_ids)):
            if chosen is not None and position not in chosen:
                continue
            gt, traces, dice, clicks = _run_slice(segmenter, item, start, n_clicks, max_objects_per_batch,
                                                  click_rule)
            rows += _slice_rows(item, gt, dice, start, n_clicks)
            click_rows += _slice_click_rows(item, clicks)
            if len(cases) < n_overlays:
                cases.append(_overlay_case(item, gt, traces, n_slices))
            n_slices += 1
            bar.update(1)
            bar.set_postfix(dice=f"{_mean([r[f'dice_{n_clicks}'] for r in rows]):.3f}")
    finally:
        bar.close()
    return rows, click_rows, cases, n_slices


def _run_slice(segmenter, item: dict, start: str, n_clicks: int, max_objects_per_batch: int, click_rule: dict):
    """One slice's objects through the protocol in batches: (gt masks, [(first object, trace)], dice K×steps,
    click rows: `click_response` of every object's every click, with its round and object index)."""
    h, w = item["input_size"]
    label_map = item["label_map"][:h, :w].numpy()
    gt = np.stack([label_map == i for i in item["label_ids"]])
    traces, clicks = [], []
    emb = embed_image(segmenter, item["image"], (h, w))  # once per slice, whatever the number of object batches
    for lo in range(0, gt.shape[0], max_objects_per_batch):
        batch = gt[lo:lo + max_objects_per_batch]

        def record(round_index, before, raw, kept, xy, label, lo=lo, batch=batch):
            responses = click_response(before.numpy(), raw.numpy(), kept.numpy(), batch, xy.numpy(), label.numpy())
            clicks.extend({"object": lo + j, "round": round_index + 1, **row}
                          for j, row in enumerate(responses) if row is not None)

        trace = run_protocol(segmenter, item["image"], batch, (h, w), start, n_clicks, embeddings=emb,
                             on_click=record, **click_rule)
        traces.append((lo, trace))
    return gt, traces, np.concatenate([trace.dice for _, trace in traces], axis=0), clicks


def _slice_rows(item: dict, gt: np.ndarray, dice: np.ndarray, start: str, n_clicks: int) -> list[dict]:
    rows = []
    for j, obj in enumerate(item["label_ids"]):
        row = {"volume_id": item["volume_id"], "slice_index": item["slice_index"], "sample": item["sample"],
               "label_id": obj, "label_name": item["label_names"][obj], "area": int(gt[j].sum()), "start": start}
        row.update({f"dice_{i}": float(dice[j, i]) for i in range(n_clicks + 1)})
        rows.append(row)
    return rows


def _slice_click_rows(item: dict, clicks: list[dict]) -> list[dict]:
    """`_run_slice`'s click rows with the slice and label they belong to (per_click.csv)."""
    rows = []
    for click in clicks:
        obj = item["label_ids"][click["object"]]
        rows.append({"volume_id": item["volume_id"], "slice_index": item["slice_index"], "label_id": obj,
                     "label_name": item["label_names"][obj],
                     **{k: v for k, v in click.items() if k != "object"}})
    return rows


def _aggregate(rows: list[dict], cases: list[OverlayCase], n_slices: int, start: str, n_clicks: int, split: str,
               seconds: float) -> EvalResult:
    """Mean Dice per step overall and per label name (with object counts)."""
    steps = [f"dice_{i}" for i in range(n_clicks + 1)]
    per_label, counts = {}, {}
    for name in sorted({r["label_name"] for r in rows}):
        mine = [r for r in rows if r["label_name"] == name]
        per_label[name] = [_mean([r[s] for r in mine]) for s in steps]
        counts[name] = len(mine)
    return EvalResult(start=start, n_clicks=n_clicks, split=split,
                      mean_dice=[_mean([r[s] for r in rows]) for s in steps], per_label=per_label,
                      label_counts=counts, rows=rows, n_slices=n_slices, seconds=seconds, cases=cases)


def _overlay_case(item: dict, gt: np.ndarray, traces, slice_no: int) -> OverlayCase:
    """Pick one object per slice (cycling through the objects) so overlays show several labels."""
    j = slice_no % gt.shape[0]
    for lo, trace in traces:
        if lo <= j < lo + trace.dice.shape[0]:
            t, jj = trace, j - lo
            break
    h, w = gt.shape[1:]
    obj = item["label_ids"][j]
    return OverlayCase(
        title=f"{item['volume_id']} slice {item['slice_index']} · {item['label_names'][obj]}",
        image=item["image"][0, :h, :w].numpy(), gt=gt[j], start_mask=t.start_masks[jj],
        final_mask=t.final_masks[jj], points=t.points[jj], point_labels=t.point_labels[jj],
        box=None if t.boxes is None else t.boxes[jj],
        dice_start=float(t.dice[jj, 0]), dice_final=float(t.dice[jj, -1]))
