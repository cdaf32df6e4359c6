"""Semantic (automatic, multi-class) evaluation: every class of every slice at once, no prompts.

Per slice the model's class logits (at the model input, S×S) are cropped to the slice's content
(`input_size`, where the shard labels live) and turned into labels (argmax). The shard's label ids
become class indices through the model's class table (`data.classes.ClassTable`: selected, merged
and renamed labels; every other id is background). For every slice and class the voxel counts
TP / FP / FN are kept; from them:

- **2D Dice** per class: over the slices where the class is in the truth or in the prediction
  (a slice where neither has it is not scored; one where only the prediction has it scores 0 —
  nnU-Net's convention), averaged over those slices;
- **3D Dice** per class and volume, when the shards come from volumes (slices share a `volume_id`):
  the counts of all evaluated slices of the volume summed, then averaged over volumes;
- a **confusion summary**: class × class voxel counts, as fractions of each true class's voxels.

Phases: check the arguments against the model and the data, choose the slices, run the model,
aggregate, write (`summary.md`, `summary.json`, `per_class.csv`, `per_slice.csv`, `confusion.csv`,
`confusion.png`, overlay PNGs with a class legend) into a staged folder swapped in whole.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.postprocess import upscale_logits


@dataclass
class SemanticOverlay:
    title: str
    image: np.ndarray   # (h, w) float in [0, 1]
    truth: np.ndarray   # (h, w) class indices
    pred: np.ndarray    # (h, w) class indices


@dataclass
class SemanticEvalResult:
    split: str
    class_names: list[str]
    per_class: list[dict]          # one row per foreground class (see `_per_class_rows`)
    mean_dice_2d: float            # mean over foreground classes of their 2D Dice
    mean_dice_3d: float | None     # same for 3D Dice; None when the slices do not come from volumes
    confusion: np.ndarray          # (C, C) voxel counts, rows = truth, columns = prediction
    slice_rows: list[dict]
    n_slices: int
    n_volumes: int
    volumetric: bool
    seconds: float
    overlays: list[SemanticOverlay] = field(default_factory=list, repr=False)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def confusion_fractions(self) -> np.ndarray:
        """Rows normalised to 1: the share of each true class's voxels given to each predicted class."""
        totals = self.confusion.sum(1, keepdims=True)
        return np.divide(self.confusion, totals, out=np.zeros(self.confusion.shape), where=totals > 0)

    def to_dict(self) -> dict:
        return {"split": self.split, "class_names": self.class_names, "mean_dice_2d": self.mean_dice_2d,
                "mean_dice_3d": self.mean_dice_3d, "per_class": self.per_class, "n_slices": self.n_slices,
                "n_volumes": self.n_volumes, "volumetric": self.volumetric,
                "confusion_counts": self.confusion.tolist(),
                "confusion_fractions": [[round(v, 6) for v in row] for row in self.confusion_fractions.tolist()],
                "seconds": round(self.seconds, 2), "files": {k: str(v) for k, v in self.files.items()}}


# ------------------------------------------------------------------------------------------ checks
def resolve_class_table(model, label_names: dict[int, str], class_table=None, where: str = "manifest"):
    """The class table the model's head was trained with, checked against the model and the data.

    `class_table`: a `ClassTable`, its dict form ({"names", "source_ids"}), or None to use the model's
    own: `model.class_table` (a trained model) or the table its semantic adapter file recorded
    (metadata `extra.classes`), failing both, the model's class names matched one to one to the
    manifest's label names.
    """
    from ..data.classes import ClassTable

    names = [str(n) for n in model.class_names]
    table = class_table if class_table is not None else getattr(model, "class_table", None)
    if table is None:
        extra = (getattr(model, "adapter_metadata", None) or {}).get("extra") or {}
        table = extra.get("classes") if isinstance(extra, dict) else None
    if isinstance(table, dict):
        try:
            table = ClassTable(names=tuple(table["names"]), source_ids=tuple(tuple(int(i) for i in ids)
                                                                             for ids in table["source_ids"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"class table: expected {{'names': [...], 'source_ids': [[...], ...]}} ({exc})") from None
    if table is None:
        by_name = {v: k for k, v in label_names.items()}
        missing = [n for n in names[1:] if n not in by_name]
        if missing:
            raise ConfigError(f"{where}: the model's classes {missing[:4]} are not label names of the shards and the "
                              "model carries no class table (label ids per class); load the model from its semantic "
                              "adapter file, or pass class_table")
        table = ClassTable(names=tuple(names), source_ids=((),) + tuple((by_name[n],) for n in names[1:]))
    if len(table.names) != int(model.num_classes) or list(table.names) != names:
        raise ConfigError(f"class table: the head predicts {model.num_classes} classes {names[:6]}"
                          f"{'...' if len(names) > 6 else ''}, but the class table has {len(table.names)} "
                          f"{list(table.names)[:6]}{'...' if len(table.names) > 6 else ''}; evaluate with the table "
                          "the head was trained with")
    unknown = [i for ids in table.source_ids for i in ids if i not in label_names]
    if unknown:
        raise ConfigError(f"{where}: label id(s) {unknown[:6]} of the model's class table are not in the shards' "
                          f"label table (ids {sorted(label_names)[:8]}{'...' if len(label_names) > 8 else ''}); "
                          "these shards were converted with other labels")
    return table


def _check_args(model, manifest, max_slices, n_overlays, batch_size, class_table):
    from ..data.manifest import load_manifest
    from ..models.semantic import SemanticSam

    if not isinstance(model, SemanticSam):
        raise ConfigError(f"evaluate --semantic: expected a semantic model (SemanticSam: encoder + class head), got "
                          f"{type(model).__name__}; load a semantic adapter, or evaluate interactively")
    for name, value, low in (("max_slices", max_slices, 1), ("overlays", n_overlays, 0), ("batch_size", batch_size, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{name}: {value!r} should be an int >= {low}")
    loaded = load_manifest(manifest)
    if model.img_size != loaded.image_size:
        raise ConfigError(f"{manifest}: shards are {loaded.image_size}² but the model takes {model.img_size}² input; "
                          f"convert the data with --size {model.img_size}")
    table = resolve_class_table(model, loaded.label_names, class_table, str(loaded.path))
    return loaded, table


# ------------------------------------------------------------------------------------------ run
def _choose(manifest, split: str, max_slices: int | None) -> tuple[set[int] | None, int]:
    """Positions (in shard order) of the slices to score: all, or `max_slices` evenly spaced."""
    from ..data.dataset import iter_eval_slices

    total = sum(1 for _ in iter_eval_slices(manifest, split=split, skip_empty=False, verify=False))
    if total == 0:
        raise ConfigError(f"{manifest}: split {split!r} holds no slices")
    if max_slices is None or max_slices >= total:
        return None, total
    return set(np.linspace(0, total - 1, max_slices).round().astype(int).tolist()), max_slices


def slice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) voxel counts of (truth, prediction) pairs of one slice."""
    flat = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def dice_from_counts(tp, fp, fn) -> float:
    """2TP / (2TP + FP + FN); NaN when neither truth nor prediction has the class."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else float("nan")


@torch.no_grad()
def _predict_batch(model, images: list[torch.Tensor]) -> np.ndarray:
    """(B, 3, S, S) images → (B, S, S) class indices (argmax of the logits at the model input)."""
    device = next(model.parameters()).device
    logits = model(torch.stack(images).to(device)).float()
    s = model.img_size
    if logits.shape[-2:] != (s, s):
        logits = upscale_logits(logits, s)
    return logits.argmax(1).cpu().numpy()


def _run(model, manifest, split, table, chosen, total, batch_size, n_overlays, progress):
    """Slices through the model: per-slice (C, C) counts, slice metadata, overlays."""
    from tqdm.auto import tqdm

    from ..data.dataset import iter_eval_slices

    c = table.num_classes
    counts, metas, overlays, pending = [], [], [], []
    overlay_at = set(np.linspace(0, total - 1, min(n_overlays, total)).round().astype(int).tolist()) \
        if n_overlays else set()
    bar = tqdm(total=total, desc=f"evaluate --semantic {split}", unit="slice", disable=not progress)

    def flush():
        preds = _predict_batch(model, [item["image"] for item in pending])
        for item, pred in zip(pending, preds):
            h, w = item["input_size"]
            truth = table.apply(item["label_map"][:h, :w].numpy())
            pred = pred[:h, :w]
            counts.append(slice_counts(pred, truth, c))
            metas.append({k: item[k] for k in ("volume_id", "slice_index", "axis", "shard", "sample")})
            if len(metas) - 1 in overlay_at:
                overlays.append(SemanticOverlay(f"{item['volume_id']} slice {item['slice_index']}",
                                                item["image"][0, :h, :w].numpy(), truth, pred))
            bar.update(1)
        pending.clear()

    try:
        for position, item in enumerate(iter_eval_slices(manifest, split=split, skip_empty=False)):
            if chosen is not None and position not in chosen:
                continue
            pending.append(item)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
    return np.stack(counts), metas, overlays


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _per_class_rows(counts: np.ndarray, metas: list[dict], names: list[str], volumetric: bool):
    """Per foreground class: 2D Dice (mean, slices scored, slices with the class only in the prediction),
    3D Dice (mean over volumes) and voxel totals. Also per-slice rows."""
    c = len(names)
    tp = np.stack([counts[:, k, k] for k in range(c)], 1)              # (N, C)
    truth = counts.sum(2)                                              # (N, C) voxels of each true class
    pred = counts.sum(1)                                               # (N, C) voxels predicted as each class
    fp, fn = pred - tp, truth - tp
    volumes = sorted({m["volume_id"] for m in metas})
    vol_index = np.array([volumes.index(m["volume_id"]) for m in metas])
    rows, slice_rows = [], []
    for k in range(1, c):
        d2 = [dice_from_counts(tp[i, k], fp[i, k], fn[i, k]) for i in range(len(metas))]
        row = {"class_index": k, "class_name": names[k],
               "dice_2d": _mean(d2), "slices_scored": int(sum(not math.isnan(v) for v in d2)),
               "slices_with_class": int((truth[:, k] > 0).sum()),
               "false_positive_slices": int(((truth[:, k] == 0) & (pred[:, k] > 0)).sum())}
        if volumetric:
            d3 = []
            for v in range(len(volumes)):
                sel = vol_index == v
                d3.append(dice_from_counts(tp[sel, k].sum(), fp[sel, k].sum(), fn[sel, k].sum()))
            row["dice_3d"] = _mean(d3)
            row["volumes_scored"] = int(sum(not math.isnan(v) for v in d3))
        row.update({"true_voxels": int(truth[:, k].sum()), "predicted_voxels": int(pred[:, k].sum()),
                    "true_positive_voxels": int(tp[:, k].sum())})
        rows.append(row)
        for i, m in enumerate(metas):
            if not math.isnan(d2[i]):
                slice_rows.append({"volume_id": m["volume_id"], "slice_index": m["slice_index"],
                                   "sample": m["sample"], "class_index": k, "class_name": names[k],
                                   "dice": d2[i], "true_voxels": int(truth[i, k]), "predicted_voxels": int(pred[i, k])})
    return rows, slice_rows, len(volumes)


def evaluate_semantic(model, manifest, split: str = "test", out_dir=None, overwrite: bool = False,
                      class_table=None, max_slices: int | None = None, n_overlays: int = 4, batch_size: int = 4,
                      progress: bool = True, title: str | None = None) -> SemanticEvalResult:
    """Score a `SemanticSam` on one split of a shard set (see the module docstring); with `out_dir` write the
    report there (a non-empty folder is refused unless `overwrite`, before anything is computed)."""
    from ..utils.paths import prepare_output_dir

    if out_dir is not None:
        prepare_output_dir(out_dir, overwrite)
    loaded, table = _check_args(model, manifest, max_slices, n_overlays, batch_size, class_table)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        chosen, total = _choose(manifest, split, max_slices)
        counts, metas, overlays = _run(model, manifest, split, table, chosen, total, batch_size, n_overlays,
                                       progress)
    finally:
        model.train(was_training)
    names = list(table.names)
    per_volume = {}
    for m in metas:
        per_volume[m["volume_id"]] = per_volume.get(m["volume_id"], 0) + 1
    volumetric = any(n > 1 for n in per_volume.values()) and all(m["axis"] >= 0 for m in metas)
    rows, slice_rows, n_volumes = _per_class_rows(counts, metas, names, volumetric)
    result = SemanticEvalResult(
        split=split, class_names=names, per_class=rows, mean_dice_2d=_mean([r["dice_2d"] for r in rows]),
        mean_dice_3d=_mean([r["dice_3d"] for r in rows]) if volumetric else None,
        confusion=counts.sum(0), slice_rows=slice_rows, n_slices=len(metas), n_volumes=n_volumes,
        volumetric=volumetric, seconds=time.perf_counter() - started, overlays=overlays)
    if out_dir is not None:
        write_semantic_outputs(result, out_dir, title)
    return result


# ------------------------------------------------------------------------------------------ outputs
def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def summary_markdown(result: SemanticEvalResult, title: str | None = None) -> str:
    names = result.class_names
    head = title or f"Semantic evaluation ({result.split} split)"
    vol = (f"{result.n_volumes} volume(s); 3D Dice sums each volume's evaluated slices" if result.volumetric
           else "the slices are 2D images (no volume has several slices): no 3D Dice")
    lines = [f"# {head}", "",
             f"{result.n_slices} slices, {len(names) - 1} foreground classes + background; {vol}. Labels = argmax of "
             "the class logits at the model input resolution (cropped to the slice content). 2D Dice: mean over the "
             "slices where the class is in the truth or the prediction (a prediction-only slice scores 0). "
             f"{result.seconds:.0f} s.", "",
             "| class | 2D Dice | slices scored | slices with class | false-positive slices |"
             + (" 3D Dice | volumes |" if result.volumetric else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if result.volumetric else "")]
    for r in result.per_class:
        extra = f" {_fmt(r['dice_3d'])} | {r['volumes_scored']} |" if result.volumetric else ""
        lines.append(f"| {r['class_index']} {r['class_name']} | {_fmt(r['dice_2d'])} | {r['slices_scored']} | "
                     f"{r['slices_with_class']} | {r['false_positive_slices']} |{extra}")
    extra = f" **{_fmt(result.mean_dice_3d)}** | |" if result.volumetric else ""
    lines.append(f"| **mean over classes** | **{_fmt(result.mean_dice_2d)}** | | | |{extra}")
    frac = result.confusion_fractions
    lines += ["", "## Confusion summary", "",
              "Share of each true class's voxels given to each predicted class (full matrix: confusion.csv, "
              "confusion.png).", "",
              "| true class | voxels | correct | most confused with | share |", "|---|---:|---:|---|---:|"]
    for k, name in enumerate(names):
        total = int(result.confusion[k].sum())
        if total == 0:
            lines.append(f"| {k} {name} | 0 | — | — | — |")
            continue
        others = [(frac[k, j], j) for j in range(len(names)) if j != k]
        share, j = max(others) if others else (0.0, k)
        lines.append(f"| {k} {name} | {total} | {frac[k, k]:.3f} | {j} {names[j]} | {share:.3f} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    from ..utils.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        fields = fields or (list(rows[0]) if rows else [])
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def _confusion_rows(result: SemanticEvalResult) -> list[dict]:
    names, frac = result.class_names, result.confusion_fractions
    rows = []
    for k, name in enumerate(names):
        row = {"true_class": f"{k} {name}", "voxels": int(result.confusion[k].sum())}
        row.update({f"pred {j} {n}": float(frac[k, j]) for j, n in enumerate(names)})
        rows.append(row)
    return rows


def save_confusion_png(result: SemanticEvalResult, path: Path) -> Path:
    from ..utils.figures import pyplot, save_png

    plt = pyplot()
    n = len(result.class_names)
    size = min(12.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(result.confusion_fractions, cmap="viridis", vmin=0, vmax=1)
    ticks = [f"{i} {name}" for i, name in enumerate(result.class_names)]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(n), ticks, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("share of each true class's voxels", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_png(fig, path)


def save_semantic_overlay(case: SemanticOverlay, names: list[str], path: Path) -> Path:
    """Three panels (image | truth | prediction) with a legend of the classes present in either map."""
    from ..utils.figures import class_colors, label_overlay, legend_handles, pyplot, save_png

    plt = pyplot()
    colors = class_colors(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.4), dpi=100)
    panels = [(case.image, "image", None), (case.image, "truth", case.truth), (case.image, "prediction", case.pred)]
    for ax, (img, label, lab) in zip(axes, panels):
        ax.imshow(img if lab is None else label_overlay(img, lab, colors), cmap="gray" if lab is None else None)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    present = sorted((set(np.unique(case.truth).tolist()) | set(np.unique(case.pred).tolist())) - {0})
    if present:
        fig.legend(handles=legend_handles(names, colors, present), loc="center right", fontsize=7, frameon=False)
    fig.suptitle(case.title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.82 if present else 1, 1))
    return save_png(fig, path)


_OWNED = re.compile(r"^(summary\.md|summary\.json|per_class\.csv|per_slice\.csv|confusion\.csv|confusion\.png|"
                    r"overlay_\d+\.png)$")


def write_semantic_outputs(result: SemanticEvalResult, out_dir, title: str | None = None) -> dict[str, Path]:
    """Every report file into a folder beside `out_dir` that replaces it whole at the end."""
    from ..utils.atomic import atomic_write_text
    from ..utils.paths import staged_folder

    out = Path(out_dir)
    with staged_folder(out, owned=lambda name: bool(_OWNED.match(name))) as stage:
        files = {"per_class_csv": _write_csv(stage / "per_class.csv", result.per_class),
                 "per_slice_csv": _write_csv(stage / "per_slice.csv", result.slice_rows,
                                             ["volume_id", "slice_index", "sample", "class_index", "class_name",
                                              "dice", "true_voxels", "predicted_voxels"]),
                 "confusion_csv": _write_csv(stage / "confusion.csv", _confusion_rows(result)),
                 "confusion_png": save_confusion_png(result, stage / "confusion.png")}
        for i, case in enumerate(result.overlays):
            files[f"overlay_{i}"] = save_semantic_overlay(case, result.class_names, stage / f"overlay_{i:02d}.png")
        atomic_write_text(stage / "summary.md", summary_markdown(result, title))
        files["summary_md"] = stage / "summary.md"
        result.files = {k: out / p.name for k, p in files.items()} | {"summary_json": out / "summary.json"}
        atomic_write_text(stage / "summary.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result.files
