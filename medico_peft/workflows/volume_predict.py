"""`medico-peft predict --volume`: a NIfTI file or DICOM series in, a label volume on the same grid out.

Everything is checked before anything is written (the volume's shape, every object's slice and prompt,
the output folder); the outputs are written into a staging folder that replaces `--out` only when
complete: `mask.nii.gz` (int16, one label id per object, the input's affine and header — a viewer shows it
on the input's grid) and `montage.png` (slices through the objects with the labels overlaid).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

MONTAGE_TILES = 12
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.float32)


@dataclass
class VolumeInput:
    path: Path
    data: np.ndarray                  # 3D array in file order
    spacing: tuple[float, float, float]
    affine: np.ndarray                # voxel → world (RAS+ mm)
    header: object | None             # nibabel header of a NIfTI input (None for DICOM/NumPy)


def read_volume_input(path: str | os.PathLike) -> VolumeInput:
    """A 3D volume with its grid: NIfTI (affine and header kept), a DICOM series folder (affine from the
    patient position/orientation tags, LPS → RAS), or .npy (identity grid). 2D and 4D inputs are refused."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: image not found")
    name = path.name.lower()
    if path.is_dir():
        from ..data.readers import read_volume

        vol = read_volume(path)
        data = np.stack([vol.get_slice(2, k) for k in range(vol.shape[2])], axis=-1)
        return VolumeInput(path, data, vol.spacing, dicom_affine(vol.data.files, vol.spacing), None)
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
        except Exception as exc:
            raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
        _check_3d(path, data.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        return VolumeInput(path, data, zooms, np.asarray(img.affine, float), img.header)
    if name.endswith(".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: cannot read NumPy file ({type(exc).__name__}: {exc})") from None
        _check_3d(path, np.shape(data))
        return VolumeInput(path, np.asarray(data), (1.0, 1.0, 1.0), np.eye(4), None)
    raise DataError(f"{path}: --volume reads NIfTI (.nii/.nii.gz), .npy or a DICOM series folder")


def check_same_grid(image: VolumeInput, other: VolumeInput, atol: float = 1e-3) -> None:
    """Refuse a second volume (labels, a mask prompt) that is not on the image's voxel grid."""
    if tuple(image.data.shape) != tuple(other.data.shape):
        raise DataError(f"{other.path}: shape {tuple(other.data.shape)} differs from {image.path}'s "
                        f"{tuple(image.data.shape)}; expected a label volume on the image's grid")
    if not np.allclose(image.affine, other.affine, atol=atol):
        raise DataError(f"{other.path}: affine differs from {image.path}'s (max difference "
                        f"{float(np.abs(image.affine - other.affine).max()):.4g} mm); expected the same voxel grid "
                        "(resample the labels onto the image first)")


def _check_3d(path: Path, shape) -> None:
    if len(shape) == 2:
        raise DataError(f"{path}: a 2D image (shape {tuple(shape)}) given to --volume; expected a 3D volume "
                        "(drop --volume to segment a 2D image)")
    if len(shape) != 3:
        raise DataError(f"{path}: {len(shape)}D input (shape {tuple(shape)}); --volume expects a 3D volume "
                        "(split a 4D series into 3D volumes first)")


def dicom_affine(files, spacing) -> np.ndarray:
    """Voxel (row, column, slice) → RAS+ mm from the first file's ImagePositionPatient/ImageOrientationPatient
    (identity directions at the origin when the tags are missing). Slices are ordered along the normal."""
    import pydicom

    ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    row_sp, col_sp, step = spacing
    if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds:
        o = np.asarray(ds.ImageOrientationPatient, float)
        along_row, along_col = o[:3], o[3:]   # direction of increasing column index, of increasing row index
        origin = np.asarray(ds.ImagePositionPatient, float)
    else:
        along_row, along_col, origin = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3)
    normal = np.cross(along_row, along_col)
    lps = np.eye(4)
    lps[:3, 0] = along_col * row_sp
    lps[:3, 1] = along_row * col_sp
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_prompts_file(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: prompts file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON prompts file ({exc})") from None
    objects = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(objects, list) or not objects:
        raise DataError(f"{path}: expected a list of objects ({{\"slice\": k, \"box\": [x0, y0, x1, y1]}}) "
                        "or {\"objects\": [...]}")
    return objects


def objects_from_args(slices, boxes, points, neg_points, corrections=None) -> list[dict]:
    """CLI prompts → object dicts: the i-th --box pairs with the i-th --slice (one --slice serves every box);
    --point/--neg-point and --correct (SLICE X Y LABEL, in the order given) belong to the single object of a
    one-object call."""
    slices, boxes = list(slices or []), list(boxes or [])
    fixes = []
    for k, x, y, lab in corrections or []:
        if lab not in (0.0, 1.0) or k != int(k):
            raise DataError(f"--correct: expected SLICE X Y LABEL with an integer slice and LABEL 1 (object) or 0 "
                            f"(background), got {k:g} {x:g} {y:g} {lab:g}")
        fixes.append({"slice": int(k), "points": [[x, y]], "labels": [int(lab)]})
    pts = [list(p) for p in (points or [])] + [list(p) for p in (neg_points or [])]
    labels = [1] * len(points or []) + [0] * len(neg_points or [])
    if not slices:
        raise DataError("--slice: --volume needs the index of the prompted slice (or a --prompts file)")
    if not boxes and not pts:
        raise DataError("--box/--point: --volume needs a box or points on the prompted slice (or a --prompts file)")
    if len(boxes) > 1:
        if pts or fixes:
            raise DataError(f"{'--point' if pts else '--correct'}: with several --box objects give points and "
                            "corrections in a --prompts file instead")
        if len(slices) not in (1, len(boxes)):
            raise DataError(f"--slice: {len(slices)} given for {len(boxes)} boxes; expected one or one per box")
        return [{"slice": slices[0] if len(slices) == 1 else slices[i], "box": b} for i, b in enumerate(boxes)]
    if len(slices) != 1:
        raise DataError(f"--slice: {len(slices)} given for one object; expected one")
    obj = {"slice": slices[0]}
    if boxes:
        obj["box"] = boxes[0]
    if pts:
        obj["points"], obj["labels"] = pts, labels
    if fixes:
        obj["corrections"] = fixes
    return [obj]


def check_objects(vp, objects: list[dict]) -> None:
    """Every object's slice, prompt and corrections checked up front, so a bad one fails before any output or
    compute."""
    from ..runtime.volume import corrections_of

    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or "slice" not in obj:
            raise DataError(f"prompts[{i}]: expected {{\"slice\": k, \"box\": [...]}} or points, got {obj!r}")
        _check_prompt(vp, obj, f"object {i + 1}")
        for j, c in enumerate(corrections_of(obj, f"object {i + 1}")):
            _check_prompt(vp, c, f"object {i + 1}, correction {j + 1}")


def _check_prompt(vp, prompt: dict, where: str) -> None:
    """One prompt dict's slice index and its points/box on that slice (at least one of them)."""
    try:
        k = vp.check_index(prompt["slice"])
        pts, _, box = vp.check_prompt(k, prompt.get("points"), prompt.get("labels"), prompt.get("box"))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    if pts is None and box is None:
        raise DataError(f"{where}: no box and no points on slice {k}")


def montage(data: np.ndarray, labels: np.ndarray, axis: int, tiles: int = MONTAGE_TILES) -> np.ndarray:
    """Up to `tiles` slices evenly over the labelled extent along `axis`, labels overlaid; H×W×3 uint8."""
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(labels.any(axis=others))
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, data.shape[axis] - 1)
    picks = np.unique(np.linspace(lo, hi, num=min(tiles, hi - lo + 1)).round().astype(int))
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    vmin, vmax = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    cells = []
    for k in picks:
        img = np.take(data, k, axis).astype(np.float32)
        grey = np.clip((img - vmin) / max(vmax - vmin, 1e-8), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        lab = np.take(labels, k, axis)
        for oid in np.unique(lab[lab > 0]):
            sel = lab == oid
            rgb[sel] = 0.5 * rgb[sel] + 0.5 * COLOURS[(int(oid) - 1) % len(COLOURS)]
        cells.append(np.rot90(rgb))  # array rows → image columns: a radiological-ish upright view
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    h, w = cells[0].shape[:2]
    sheet = np.zeros((rows * h, cols * w, 3), np.float32)
    for i, c in enumerate(cells):
        r, q = divmod(i, cols)
        sheet[r * h:(r + 1) * h, q * w:(q + 1) * w] = c
    return sheet.astype(np.uint8)


def write_outputs(out: Path, vin: VolumeInput, labels: np.ndarray, axis: int, overwrite: bool) -> tuple[Path, Path]:
    """mask.nii.gz (input affine + header, int16) and montage.png, swapped into `out` whole."""
    import nibabel as nib
    from PIL import Image

    from ..utils.paths import staged_folder

    if vin.header is not None:
        header = vin.header.copy()
        header.set_data_dtype(np.int16)
        header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, never rescaled
        img = nib.Nifti1Image(labels.astype(np.int16), vin.affine, header)
    else:
        img = nib.Nifti1Image(labels.astype(np.int16), vin.affine)
        img.header.set_zooms(vin.spacing)
    img.header["descrip"] = b"medico-peft predict --volume"
    with staged_folder(out) as stage:
        nib.save(img, str(stage / "mask.nii.gz"))
        Image.fromarray(montage(vin.data, labels, axis)).save(stage / "montage.png", format="PNG")
    return out / "mask.nii.gz", out / "montage.png"


def predict_volume(image: str | os.PathLike, out: str | os.PathLike, make_predictor, objects: list[dict], *,
                   axis: int = 2, overwrite: bool = False, intensity: str | None = "mr_percentile",
                   **volume_options) -> dict:
    """Segment `objects` (dicts as `segment_objects` takes them) in the volume at `image`; write the outputs.

    `make_predictor()` builds the `Predictor` (called after the inputs passed their checks).
    Returns a summary: paths, voxels per object, encoded slices.
    """
    from ..runtime.volume import VolumePredictor, segment_objects
    from ..utils.paths import prepare_output_dir

    out = prepare_output_dir(out, overwrite)
    vin = read_volume_input(image)
    if not isinstance(axis, int) or not 0 <= axis <= 2:
        raise DataError(f"--axis: expected 0, 1 or 2, got {axis}")

    vp = VolumePredictor(None, **volume_options).set_volume(vin.data, axis=axis, spacing=vin.spacing,
                                                                          affine=vin.affine, intensity=intensity)
    check_objects(vp, objects)
    vp.predictor = make_predictor()
    labels = segment_objects(vp, objects)
    mask_path, montage_path = write_outputs(out, vin, labels, axis, overwrite)
    return {"mask": mask_path, "montage": montage_path, "encoded_slices": vp.encoded_slices(),
            "voxels": {int(i): int((labels == i).sum()) for i in np.unique(labels) if i > 0},
            "objects": len(objects), "shape": tuple(labels.shape)}
