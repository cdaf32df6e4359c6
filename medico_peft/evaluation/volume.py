"""3D interactive evaluation (MedicoSAM / micro-sam style): one prompt on one slice, propagation through
the volume, then corrective rounds on whichever slice is most wrong.

Per object (a boolean 3D mask on the image grid):

1. Start slice: the middle of the object's extent along `axis` (`start_slice="middle"`; if the object
   is absent there, e.g. a C shape, the nearest slice that holds it) or the slice with the largest
   cross-section (`"largest"`).
2. Start prompt on that slice: the object's tight box (`start="box"`) or one positive point at its
   deepest pixel (`"point"`); `VolumePredictor.segment` segments the slice and propagates both ways.
3. `rounds` corrective rounds. Each round places one click: on the slice with the most wrong voxels
   (false positives + false negatives, counted per slice), in that slice's larger error region by pixel
   count (a positive click in the false negatives if they are at least as many as the false positives,
   else a negative click in the false positives), at the region's deepest pixel (farthest from its edge,
   `data.prompts.deepest_pixel`). `VolumePredictor.correct` re-segments that slice and re-propagates.
   A perfect prediction gets no more clicks (its scores are carried forward).

Scores after the start and after every round: 3D Dice and the normalised surface Dice (NSD) at a
tolerance in millimetres, with distances measured in the voxel spacing (so anisotropic volumes are
scored in physical units). Outputs: per_object.csv, summary.md, summary.json, dice_vs_round.png and
one slice montage (prediction vs truth) per object up to `n_montages`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data.prompts import deepest_pixel, mask_box
from ..errors import ConfigError, DataError

STARTS = ("box", "point")
START_SLICES = ("middle", "largest")


# --------------------------------------------------------------------------------------------- metrics
def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|); two empty masks score 1.0."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with at least one face neighbour outside it (the volume's edge counts as outside)."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, bool)
    return mask & ~binary_erosion(mask, border_value=0)


def _crop_to(masks: Sequence[np.ndarray]) -> tuple[slice, ...]:
    """Bounding box of the union of `masks`, one voxel of margin (all surface voxels lie inside it)."""
    union = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    index = []
    for ax in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(i for i in range(union.ndim) if i != ax)))
        index.append(slice(max(0, hit[0] - 1), hit[-1] + 2))
    return tuple(index)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(distance of every surface voxel of `a` to the surface of `b`, and of `b`'s to `a`'s), in the units of
    `spacing` (mm): Euclidean distance transforms of the complement of each surface, read at the other surface.
    Both masks must be non-empty."""
    from scipy.ndimage import distance_transform_edt

    crop = _crop_to([a, b])
    sa, sb = surface_voxels(np.asarray(a, bool)[crop]), surface_voxels(np.asarray(b, bool)[crop])
    to_b = distance_transform_edt(~sb, sampling=spacing)
    to_a = distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice: the share of both surfaces lying within `tolerance_mm` of the other surface,
    (|{p ∈ ∂P: d(p, ∂G) ≤ τ}| + |{g ∈ ∂G: d(g, ∂P) ≤ τ}|) / (|∂P| + |∂G|). Two empty masks score 1.0, one
    empty mask 0.0."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    d_pred, d_gt = surface_distances(pred, gt, spacing)
    return float(((d_pred <= tolerance_mm).sum() + (d_gt <= tolerance_mm).sum()) / (d_pred.size + d_gt.size))


# ------------------------------------------------------------------------------------ protocol pieces
def per_slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Voxels of `mask` on every slice along `axis`."""
    return np.asarray(mask, bool).sum(axis=tuple(i for i in range(3) if i != axis))


def start_slice_index(gt: np.ndarray, axis: int, how: str = "middle") -> int:
    """The start slice: middle of the object's extent (nearest slice holding it), or the largest cross-section."""
    if how not in START_SLICES:
        raise ConfigError(f"start_slice: {how!r} should be one of {', '.join(START_SLICES)}")
    area = per_slice_counts(gt, axis)
    present = np.flatnonzero(area)
    if present.size == 0:
        raise DataError("object is empty: no voxel to prompt")
    if how == "largest":
        return int(np.argmax(area))
    middle = (present[0] + present[-1]) / 2.0
    return int(present[np.argmin(np.abs(present - middle))])  # ties: the lower slice


def worst_slice(pred: np.ndarray, gt: np.ndarray, axis: int) -> tuple[int, int]:
    """(slice index, wrong voxels on it) for the slice with the most false positives + false negatives."""
    errors = per_slice_counts(np.asarray(pred, bool) ^ np.asarray(gt, bool), axis)
    index = int(np.argmax(errors))
    return index, int(errors[index])


def corrective_click(pred_slice: np.ndarray, gt_slice: np.ndarray):
    """((x, y), label) in the larger error region of one slice by pixel count, at its deepest pixel; positive
    (1) in the false negatives when they are at least as many as the false positives, else negative (0).
    None when the slice is already right."""
    pred_slice, gt_slice = np.asarray(pred_slice, bool), np.asarray(gt_slice, bool)
    fn, fp = gt_slice & ~pred_slice, pred_slice & ~gt_slice
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn == 0 and n_fp == 0:
        return None
    region, label = (fn, 1) if n_fn >= n_fp else (fp, 0)
    row, col, _ = deepest_pixel(region)
    return (float(col), float(row)), label


@dataclass
class Click:
    slice_index: int
    xy: tuple[float, float]
    label: int  # 1 positive, 0 negative
    slice_errors: int  # wrong voxels on that slice before the click

    def text(self) -> str:
        return f"{self.slice_index}:{self.xy[0]:g},{self.xy[1]:g}:{'+' if self.label == 1 else '-'}"


@dataclass
class VolumeTrace:
    """One object through the protocol: scores after the start (index 0) and after every round."""

    dice: list[float]
    nsd: list[float]
    start_slice: int
    start_prompt: dict
    clicks: list[Click]
    final_mask: np.ndarray = field(repr=False)
    seconds: float = 0.0


def _scores(pred, gt, spacing, tolerance_mm) -> tuple[float, float]:
    return dice_3d(pred, gt), nsd(pred, gt, spacing, tolerance_mm)


def run_volume_protocol(volume_predictor, gt: np.ndarray, *, axis: int, spacing: Sequence[float],
                        start: str = "box", start_slice: str = "middle", rounds: int = 5,
                        tolerance_mm: float = 2.0) -> VolumeTrace:
    """The protocol for one object on a `VolumePredictor` whose volume is already set along `axis`.

    `gt` is the object's boolean mask on the volume grid; slice i is `np.take(gt, i, axis)`, as for the volume.
    """
    if start not in STARTS:
        raise ConfigError(f"start: {start!r} should be one of {', '.join(STARTS)}")
    t0 = time.perf_counter()
    gt = np.asarray(gt, bool)
    index = start_slice_index(gt, axis, start_slice)
    gt_slice = np.take(gt, index, axis)
    if start == "box":
        prompt = {"box": [float(v) for v in mask_box(gt_slice)]}
        pred = volume_predictor.segment(index, box=prompt["box"])
    else:
        row, col, _ = deepest_pixel(gt_slice)
        prompt = {"points": [[float(col), float(row)]], "labels": [1]}
        pred = volume_predictor.segment(index, points=prompt["points"], labels=prompt["labels"])
    pred = np.asarray(pred, bool)
    d, s = _scores(pred, gt, spacing, tolerance_mm)
    dice, surface, clicks = [d], [s], []
    for _ in range(rounds):
        where, wrong = worst_slice(pred, gt, axis)
        click = None if wrong == 0 else corrective_click(np.take(pred, where, axis), np.take(gt, where, axis))
        if click is None:  # perfect: nothing left to click
            dice.append(dice[-1])
            surface.append(surface[-1])
            continue
        xy, label = click
        clicks.append(Click(where, xy, label, wrong))
        pred = np.asarray(volume_predictor.correct(where, points=[list(xy)], labels=[label]), bool)
        d, s = _scores(pred, gt, spacing, tolerance_mm)
        dice.append(d)
        surface.append(s)
    return VolumeTrace(dice, surface, index, prompt, clicks, pred, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class VolumeInput:
    """An image volume, its label volume on the same grid, voxel spacing (mm), affine and label names.

    `extra_objects` are named masks that are not a label id (e.g. MNI152's brain mask)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None
    label_names: dict[int, str]
    volume_id: str
    extra_objects: dict[str, np.ndarray] = field(default_factory=dict)


def _nifti_array(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # truncated gzip, bad header
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: {what} has shape {data.shape}; expected a 3D volume (X, Y, Z)")
    if min(data.shape) < 2:
        raise DataError(f"{path}: {what} has shape {data.shape}; a volume needs at least 2 voxels along each axis")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, img.affine, zooms


def load_volume_pair(image_path, label_path, label_names_path=None) -> VolumeInput:
    """Image + label NIfTI on the same grid (same shape and affine); DataError naming both files otherwise."""
    image_path, label_path = Path(image_path), Path(label_path)
    image, affine, spacing = _nifti_array(image_path, "image")
    labels, label_affine, _ = _nifti_array(label_path, "label volume")
    if labels.shape != image.shape:
        raise DataError(f"{label_path}: label grid {labels.shape} differs from the image grid {image.shape} of "
                        f"{image_path}; resample the labels onto the image grid")
    if not np.allclose(label_affine, affine, atol=1e-3):
        raise DataError(f"{label_path}: label affine differs from the image affine of {image_path} "
                        f"(max difference {np.abs(label_affine - affine).max():.4g}); resample the labels onto the "
                        "image grid")
    if labels.dtype.kind == "f":
        if not np.all(np.mod(labels, 1) == 0):
            raise DataError(f"{label_path}: label volume holds non-integer values; expected integer label ids")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{label_path}: negative label id {labels.min()}; expected ids >= 0")
    if label_names_path is not None:
        from ..data.labels import read_label_names

        names = read_label_names(label_names_path)
    else:
        names = {}
    present = [int(v) for v in np.unique(labels) if v != 0]
    names = {i: names.get(i, str(i)) for i in present}
    stem = re.sub(r"\.nii(\.gz)?$", "", image_path.name)
    return VolumeInput(np.asarray(image, np.float32), labels, spacing, affine, names, stem)


BUILTIN = ("colin27", "mni152")


def builtin_volume(name: str, resolution: int = 1) -> VolumeInput:
    """Real data needing no download: Colin27 T1 + AAL atlas (`colin27`, 1 mm) or nilearn's MNI152 template
    with grey/white-matter labels and its brain mask as the extra object `brain` (`mni152`, 1 or 2 mm)."""
    from ..data import real_data

    if name == "colin27":
        image_path, atlas_path, names_path = real_data.colin27_paths()
        return load_volume_pair(image_path, atlas_path, names_path)
    if name == "mni152":
        from nilearn import datasets

        template, labels = real_data.mni152_volumes(resolution)
        brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
        spacing = tuple(float(z) for z in template.header.get_zooms()[:3])
        return VolumeInput(np.asarray(template.dataobj, np.float32), labels.astype(np.int64), spacing,
                           template.affine, dict(real_data.MNI152_LABEL_NAMES), f"mni152_{resolution}mm",
                           {"brain": brain})
    raise ConfigError(f"data: {name!r} should be one of {', '.join(BUILTIN)}")


def load_volume_input(*, image=None, label_volume=None, label_names=None, data=None,
                      resolution: int = 1) -> VolumeInput:
    """The CLI's inputs: an image + label NIfTI pair, or built-in real data (`data`), never both."""
    if data is not None:
        if image is not None or label_volume is not None:
            raise ConfigError("--data: give either --data or --image/--label-volume, not both")
        return builtin_volume(data, resolution)
    if image is None or label_volume is None:
        raise ConfigError("--image and --label-volume: 3D evaluation needs an image volume and its label volume "
                          f"(NIfTI), or --data {'|'.join(BUILTIN)}")
    return load_volume_pair(image, label_volume, label_names)


def _match_spec(spec: str, vol: VolumeInput, where: str) -> list[int] | str:
    text = spec.strip()
    if text in vol.extra_objects:
        return text
    if text.isdigit():
        if int(text) not in vol.label_names:
            raise ConfigError(f"labels: id {text} is not in {where}")
        return [int(text)]
    hits = [i for i, n in vol.label_names.items() if fnmatch.fnmatchcase(n.lower(), text.lower())]
    if not hits:
        raise ConfigError(f"labels: {text!r} matches no label name in {where}")
    return hits


def select_objects(vol: VolumeInput, items: Sequence[str] | None, where: str = "the label volume") \
        -> dict[str, np.ndarray]:
    """Object masks from label selections. Each item is one object: `[NAME=]SPEC[+SPEC...]`, a SPEC being a
    label id, a label name, a name glob or an extra object's name; every label a SPEC matches is merged into
    the object (e.g. `cerebellum_L=Cerebelum_*_L`). No items: every label present (and extra object) is one
    object."""
    if not items:
        objects = {name: vol.labels == i for i, name in sorted(vol.label_names.items())}
        objects.update(vol.extra_objects)
        return objects
    objects: dict[str, np.ndarray] = {}
    for item in items:
        name, _, body = item.rpartition("=")
        name = name.strip() or body.strip()
        if not body.strip():
            raise ConfigError(f"labels: {item!r} selects nothing; expected [NAME=]SPEC[+SPEC...]")
        mask = np.zeros(vol.labels.shape, bool)
        for spec in body.split("+"):
            hit = _match_spec(spec, vol, where)
            mask |= vol.extra_objects[hit] if isinstance(hit, str) else np.isin(vol.labels, hit)
        if name in objects:
            raise ConfigError(f"labels: object name {name!r} given twice")
        objects[name] = mask
    return objects


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class MontageCase:
    name: str
    image: np.ndarray = field(repr=False)
    gt: np.ndarray = field(repr=False)
    pred: np.ndarray = field(repr=False)
    trace: VolumeTrace = field(repr=False)


@dataclass
class VolumeEvalResult:
    """Mean 3D Dice / NSD per round (0 = start prompt), per object rows, and where the files went."""

    volume_id: str
    axis: int
    start: str
    start_slice: str
    rounds: int
    tolerance_mm: float
    spacing: tuple[float, float, float]
    rows: list[dict]
    mean_dice: list[float]
    mean_nsd: list[float]
    encoded_slices: int | None
    seconds: float
    cases: list[MontageCase] = field(default_factory=list, repr=False)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        return {"volume_id": self.volume_id, "axis": self.axis, "start": self.start, "start_slice": self.start_slice,
                "rounds": self.rounds, "tolerance_mm": self.tolerance_mm, "spacing": list(self.spacing),
                "mean_dice": self.mean_dice, "mean_nsd": self.mean_nsd, "n_objects": self.n_objects,
                "encoded_slices": self.encoded_slices, "seconds": round(self.seconds, 2),
                "objects": {r["object"]: {"dice": [r[f"dice_{i}"] for i in range(self.rounds + 1)],
                                          "nsd": [r[f"nsd_{i}"] for i in range(self.rounds + 1)]}
                            for r in self.rows},
                "files": {k: str(v) for k, v in self.files.items()}}


def validate_volume_inputs(image, objects: Mapping[str, np.ndarray], *, axis: int, spacing, rounds: int,
                           tolerance_mm: float, start: str, start_slice: str) -> tuple[np.ndarray, tuple]:
    """One clear error for each bad input, before any work: returns (image as an array, spacing as floats)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise DataError(f"image: expected a 3D volume, got shape {image.shape}"
                        + (" (a 2D image: use `medico-peft evaluate` without --3d)" if image.ndim == 2 else ""))
    if axis not in (0, 1, 2):
        raise ConfigError(f"axis: {axis!r} should be 0, 1 or 2")
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ConfigError(f"spacing: {spacing!r} should be three positive numbers (mm)") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(f"spacing: {spacing!r} should be three positive numbers (mm)")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ConfigError(f"rounds: {rounds!r} should be an int >= 0")
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ConfigError(f"tolerance_mm: {tolerance_mm!r} should be a number >= 0")
    if start not in STARTS:
        raise ConfigError(f"start: {start!r} should be one of {', '.join(STARTS)}")
    if start_slice not in START_SLICES:
        raise ConfigError(f"start_slice: {start_slice!r} should be one of {', '.join(START_SLICES)}")
    if not objects:
        raise ConfigError("labels: no object to evaluate")
    for name, mask in objects.items():
        if np.shape(mask) != image.shape:
            raise DataError(f"object {name!r}: label grid {np.shape(mask)} differs from the image grid {image.shape}")
        if not np.any(mask):
            raise DataError(f"object {name!r}: no voxel in the label volume")
    return image, spacing


def evaluate_volume(predictor, image, objects: Mapping[str, np.ndarray], *, axis: int = 2,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), affine=None, start: str = "box",
                    start_slice: str = "middle", rounds: int = 5, tolerance_mm: float = 2.0, out_dir=None,
                    n_montages: int = 4, title: str | None = None, volume_id: str = "volume",
                    progress: bool = True, volume_options: Mapping | None = None,
                    intensity: str | None = "mr_percentile") -> VolumeEvalResult:
    """Run the 3D protocol on every object of one volume along one axis.

    `predictor`: a runtime `Predictor` (wrapped in a `VolumePredictor` built with `volume_options`) or a
    `VolumePredictor`. The volume is set once, so slice embeddings are shared by all objects. With
    `out_dir`, writes per_object.csv, summary.md, summary.json, dice_vs_round.png and montage PNGs.
    `intensity`: the volume-wide window (`VolumePredictor.set_volume`; a `data.normalize` preset or None).
    """
    from tqdm.auto import tqdm

    image, spacing = validate_volume_inputs(image, objects, axis=axis, spacing=spacing, rounds=rounds,
                                            tolerance_mm=tolerance_mm, start=start, start_slice=start_slice)
    vp = _as_volume_predictor(predictor, volume_options)
    t0 = time.perf_counter()
    vp.set_volume(image, axis=axis, spacing=spacing, affine=affine, intensity=intensity)
    rows: list[dict] = []
    cases: list[MontageCase] = []
    for name, mask in tqdm(objects.items(), desc=f"3D evaluate axis {axis}", unit="object", disable=not progress):
        gt = np.asarray(mask, bool)
        trace = run_volume_protocol(vp, gt, axis=axis, spacing=spacing, start=start, start_slice=start_slice,
                                    rounds=rounds, tolerance_mm=tolerance_mm)
        rows.append(_row(volume_id, axis, name, gt, trace, start, rounds))
        if len(cases) < n_montages:
            cases.append(MontageCase(name, image, gt, trace.final_mask, trace))
    encoded = vp.encoded_slices() if hasattr(vp, "encoded_slices") else None
    result = VolumeEvalResult(
        volume_id=volume_id, axis=axis, start=start, start_slice=start_slice, rounds=rounds,
        tolerance_mm=float(tolerance_mm), spacing=spacing, rows=rows,
        mean_dice=[float(np.mean([r[f"dice_{i}"] for r in rows])) for i in range(rounds + 1)],
        mean_nsd=[float(np.mean([r[f"nsd_{i}"] for r in rows])) for i in range(rounds + 1)],
        encoded_slices=encoded, seconds=time.perf_counter() - t0, cases=cases)
    if out_dir is not None:
        write_volume_outputs(result, out_dir, title=title)
    return result


def _as_volume_predictor(predictor, options):
    if hasattr(predictor, "set_volume") and hasattr(predictor, "correct"):
        return predictor
    from ..runtime.volume import VolumePredictor

    return VolumePredictor(predictor, **dict(options or {}))


def _row(volume_id: str, axis: int, name: str, gt: np.ndarray, trace: VolumeTrace, start: str, rounds: int) -> dict:
    present = np.flatnonzero(per_slice_counts(gt, axis))
    row = {"volume_id": volume_id, "axis": axis, "object": name, "voxels": int(gt.sum()),
           "slices": f"{present[0]}-{present[-1]}", "start": start, "start_slice": trace.start_slice}
    row.update({f"dice_{i}": float(trace.dice[i]) for i in range(rounds + 1)})
    row.update({f"nsd_{i}": float(trace.nsd[i]) for i in range(rounds + 1)})
    row["clicks"] = " ".join(c.text() for c in trace.clicks)
    row["seconds"] = round(trace.seconds, 2)
    return row


# --------------------------------------------------------------------------------------------- outputs
def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def volume_summary_markdown(result: VolumeEvalResult, title: str | None = None) -> str:
    """Per object: 3D Dice after the start prompt and every round, NSD at the start and at the end."""
    n = result.rounds
    axis_name = {0: "0", 1: "1", 2: "2"}[result.axis]
    head = title or f"3D interactive evaluation ({result.volume_id}, axis {axis_name})"
    sp = " × ".join(f"{s:g}" for s in result.spacing)
    lines = [f"# {head}", "",
             f"{result.n_objects} objects; start = one {'tight box' if result.start == 'box' else 'point at the deepest pixel'} "
             f"on the object's {'middle' if result.start_slice == 'middle' else 'largest'} slice along axis "
             f"{result.axis}, propagated through the volume, then {n} corrective rounds (one click each on the slice "
             f"with the most wrong voxels, in its larger error region). 3D Dice; NSD at {result.tolerance_mm:g} mm "
             f"(voxel spacing {sp} mm); {result.seconds:.0f} s"
             + (f", {result.encoded_slices} slices encoded." if result.encoded_slices is not None else "."), "",
             "| object | voxels | " + " | ".join(["start"] + [f"+{i}" for i in range(1, n + 1)])
             + f" | NSD start | NSD +{n} |",
             "|---|---:|" + "---:|" * (n + 3)]
    for r in result.rows:
        lines.append(f"| {r['object']} | {r['voxels']} | " + " | ".join(_fmt(r[f"dice_{i}"]) for i in range(n + 1))
                     + f" | {_fmt(r['nsd_0'])} | {_fmt(r[f'nsd_{n}'])} |")
    lines.append(f"| **mean** | {result.n_objects} | " + " | ".join(f"**{_fmt(v)}**" for v in result.mean_dice)
                 + f" | **{_fmt(result.mean_nsd[0])}** | **{_fmt(result.mean_nsd[-1])}** |")
    return "\n".join(lines) + "\n"


def plot_rounds(curves: Mapping[str, Sequence[float]], path, title: str, ylabel: str = "3D Dice") -> Path:
    """One line per curve over corrective rounds (0 = start prompt)."""
    from ..utils.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("corrective round (0 = start prompt)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def montage_slices(gt: np.ndarray, axis: int, start: int, n: int = 8) -> list[int]:
    """`n` slices evenly over the object's extent along `axis`, the start slice among them."""
    present = np.flatnonzero(per_slice_counts(gt, axis))
    picks = set(np.linspace(present[0], present[-1], min(n, present.size)).round().astype(int).tolist())
    if start not in picks:
        picks.discard(min(picks, key=lambda i: abs(i - start)))
        picks.add(start)
    return sorted(picks)


def save_montage(case: MontageCase, axis: int, path, n: int = 8) -> Path:
    """Slices across the object: image, truth contour (green) and final prediction (red), 2D Dice per slice;
    the start slice is marked, clicks on a shown slice are drawn (+ positive, x negative)."""
    from ..utils.figures import pyplot, save_png

    plt = pyplot()
    picks = montage_slices(case.gt, axis, case.trace.start_slice, n)
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), dpi=100, squeeze=False)
    lo, hi = float(np.percentile(case.image, 1)), float(np.percentile(case.image, 99))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks):
        img, g, p = (np.take(a, i, axis) for a in (case.image, case.gt, case.pred))
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if g.any():
            ax.contour(g.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        if p.any():
            ax.contour(p.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        for c in case.trace.clicks:
            if c.slice_index == i:
                ax.plot(*c.xy, marker="+" if c.label == 1 else "x", color="cyan" if c.label == 1 else "magenta",
                        markersize=7, mew=1.5)
        mark = " (start)" if i == case.trace.start_slice else ""
        ax.set_title(f"slice {i}{mark}: Dice {dice_3d(p, g):.2f}", fontsize=8)
    fig.suptitle(f"{case.name}: 3D Dice {case.trace.dice[-1]:.3f} after {len(case.trace.dice) - 1} rounds "
                 "(green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


_VOLUME_FILE = re.compile(r"^(per_object\.csv|summary\.md|summary\.json|dice_vs_round\.png|montage_\d+\.png)$")


def write_volume_outputs(result: VolumeEvalResult, out_dir, title: str | None = None) -> dict[str, Path]:
    """All files into a staged folder that replaces `out_dir` in one swap (nothing half-written)."""
    from ..utils.atomic import atomic_write_text
    from ..utils.paths import staged_folder
    from .report import write_csv

    out = Path(out_dir)
    with staged_folder(out, owned=lambda name: bool(_VOLUME_FILE.match(name))) as stage:
        files = {"per_object_csv": write_csv(result.rows, stage / "per_object.csv")}
        curves = {"mean Dice": result.mean_dice, "mean NSD": result.mean_nsd}
        if len(result.rows) <= 8:
            curves.update({r["object"]: [r[f"dice_{i}"] for i in range(result.rounds + 1)] for r in result.rows})
        files["dice_vs_round_png"] = plot_rounds(
            curves, stage / "dice_vs_round.png", ylabel=f"3D Dice (NSD at {result.tolerance_mm:g} mm)",
            title=f"{result.volume_id}, axis {result.axis}: 3D Dice vs corrective round")
        for i, case in enumerate(result.cases):
            files[f"montage_{i}"] = save_montage(case, result.axis, stage / f"montage_{i:02d}.png")
        atomic_write_text(stage / "summary.md", volume_summary_markdown(result, title))
        files["summary_md"] = stage / "summary.md"
        files = {key: out / p.name for key, p in files.items()}
        files["summary_json"] = out / "summary.json"
        result.files = files
        atomic_write_text(stage / "summary.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return files
