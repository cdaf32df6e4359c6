"""Files in and out of semantic prediction: a 2D image → `labels.png` (+ overlay with a legend); a 3D volume
(NIfTI or .npy) → a label volume on the same grid (NIfTI: same affine and header, label dtype, no
intensity scaling), predicted slice by slice along an axis; `classes.json` names each class index.

Every prediction is computed before anything is written, and each file is written atomically.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_nifti_volume(path: Path):
    """(data as a numeric array, the nibabel image) of a NIfTI file; a truncated .gz is refused."""
    import nibabel as nib

    try:
        if path.name.lower().endswith(".gz"):  # read to the end: gzip's CRC and length trailer catch truncation
            with gzip.open(path) as stream:
                while stream.read(1 << 24):
                    pass
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
    return data, img


def is_volume_input(path: str | os.PathLike, slice_index: int | None) -> bool:
    """True when `path` holds a 3D volume and no single slice was asked for (then the whole volume is segmented)."""
    path = Path(path)
    if slice_index is not None or not path.name.lower().endswith(VOLUME_SUFFIXES):
        return False
    if _is_nifti(path):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape
        except Exception as exc:
            raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
    else:
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception as exc:
            raise DataError(f"{path}: cannot read .npy array ({type(exc).__name__}: {exc})") from None
    shape = tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)
    if _is_nifti(path):
        return len(shape) == 3
    return len(shape) == 3 and shape[2] not in (1, 3)  # H×W×1 / H×W×3 arrays are images


def nifti_bytes(labels: np.ndarray, like, compress: bool) -> bytes:
    """A NIfTI image of `labels` on `like`'s grid: its affine and header (sform/qform, zooms, units), the label
    dtype and no intensity scaling (slope 1, intercept 0)."""
    header = like.header.copy()
    out = type(like)(labels, like.affine, header=header)
    out.set_data_dtype(labels.dtype)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["descrip"] = b"medico-peft semantic labels"
    raw = out.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def write_classes_json(path: Path, class_names: list[str], extra: dict | None = None) -> Path:
    from ..utils.atomic import atomic_write_text

    data = {"classes": {str(i): name for i, name in enumerate(class_names)},
            "background": 0, "labels": "class index per voxel (argmax of the class logits)", **(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def save_label_overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path,
                       title: str = "") -> Path:
    from ..utils.figures import class_colors, label_overlay, legend_handles, pyplot, save_png

    plt = pyplot()
    img = np.asarray(image, np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    colors = class_colors(len(class_names))
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=100)
    ax.imshow(label_overlay(img, labels, colors))
    ax.axis("off")
    present = [int(i) for i in np.unique(labels) if i != 0]
    if present:
        ax.legend(handles=legend_handles(class_names, colors, present), loc="center left", bbox_to_anchor=(1.0, 0.5),
                  fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def write_label_png(path: Path, labels: np.ndarray) -> Path:
    """Class indices as an 8-bit (≤ 256 classes) or 16-bit greyscale PNG."""
    from PIL import Image

    from ..utils.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(labels.astype(np.uint8) if labels.dtype == np.uint8 else labels.astype(np.uint16)).save(
            tmp, format="PNG")
    return path


def predict_semantic_file(predictor, image_path, out_dir, axis: int = 2, slice_index: int | None = None,
                          progress=None) -> dict:
    """Segment a 2D image or a whole 3D volume with a semantic `Predictor`; returns {"kind", "files", "counts"}.

    2D (PNG/JPEG/TIFF, a 2D .npy, or one `slice_index` of a volume): labels.png, labels_overlay.png.
    3D (NIfTI or .npy without `slice_index`): labels.nii.gz (or labels.npy), same shape; the overlay shows the
    middle slice along `axis`. Both write classes.json.
    """
    from ..utils.atomic import atomic_path, atomic_write_bytes
    from .image_io import read_image

    out = Path(out_dir)
    path = Path(image_path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    names = predictor.class_names
    predictor.require_task("semantic", "predict --semantic")
    files = {}
    if is_volume_input(path, slice_index):
        if _is_nifti(path):
            data, like = read_nifti_volume(path)
        else:
            data, like = np.load(path, allow_pickle=False), None
        labels = predictor.predict_semantic_volume(data, axis, progress)
        mid = labels.shape[axis] // 2
        vol = data[..., 0] if data.ndim == 4 else data
        out.mkdir(parents=True, exist_ok=True)
        if like is not None:
            files["labels"] = out / "labels.nii.gz"
            atomic_write_bytes(files["labels"], nifti_bytes(labels, like, compress=True))
        else:
            files["labels"] = out / "labels.npy"
            with atomic_path(files["labels"], suffix=".npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, labels)
        files["overlay"] = save_label_overlay(np.take(vol, mid, axis=axis), np.take(labels, mid, axis=axis), names,
                                              out / "labels_overlay.png", f"{path.name}: slice {mid} along axis {axis}")
        kind = "volume"
        extra = {"source": str(path), "axis": axis, "shape": list(labels.shape)}
    else:
        image = read_image(path, slice_index, axis)
        labels = predictor.predict_semantic(image).labels
        out.mkdir(parents=True, exist_ok=True)
        files["labels"] = write_label_png(out / "labels.png", labels)
        files["overlay"] = save_label_overlay(image, labels, names, out / "labels_overlay.png", path.name)
        kind = "image"
        extra = {"source": str(path), "shape": list(labels.shape)}
        if slice_index is not None:
            extra.update(slice=slice_index, axis=axis)
    files["classes"] = write_classes_json(out / "classes.json", names, extra)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(names))
    return {"kind": kind, "files": files, "counts": {names[i]: int(c) for i, c in enumerate(counts) if c}}
