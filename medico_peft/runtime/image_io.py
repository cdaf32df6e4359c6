"""Reading one 2D image for prediction (PNG/JPEG/TIFF, .npy, NIfTI slice) and writing mask/overlay PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _ends_with_png_iend(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - len(PNG_END)))
        return handle.read() == PNG_END


def read_image(path: str | os.PathLike, slice_index: int | None = None, axis: int = 2) -> np.ndarray:
    """A 2D (or H×W×3) array; 3D volumes (NIfTI, .npy) give the slice `slice_index` along `axis` (middle by default)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            if name.endswith(".gz"):  # read to the end: gzip's CRC and length trailer catch a truncated file
                import gzip

                with gzip.open(path) as stream:
                    while stream.read(1 << 24):
                        pass
            data = np.asarray(nib.load(str(path)).dataobj)
        elif name.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.ndarray):  # an .npz archive (or any zip) opens as NpzFile
                data.close()
                raise DataError(f"{path}: not a .npy array (a zip/.npz archive?); expected one array saved by np.save")
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            data = np.asarray(tifffile.imread(str(path)))
        elif name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
            from PIL import Image

            if name.endswith(".png") and not _ends_with_png_iend(path):
                raise DataError(f"{path}: truncated PNG (no IEND chunk at the end); expected a complete PNG file")
            with Image.open(path) as im:
                im.verify()  # chunk checksums: an altered file is refused, not half-decoded
            with Image.open(path) as im:
                data = np.asarray(im.convert("RGB") if im.mode not in ("L", "I;16", "I", "F") else im)
        else:
            raise DataError(f"{path}: unsupported image type; expected .png/.jpg/.tif/.npy/.nii/.nii.gz")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 3 and data.shape[-1] not in (1, 3):
        if not 0 <= axis <= 2:
            raise DataError(f"--axis: expected 0, 1 or 2, got {axis}")
        n = data.shape[axis]
        index = n // 2 if slice_index is None else slice_index
        if not 0 <= index < n:
            raise DataError(f"--slice: {index} is outside the volume ({n} slices along axis {axis})")
        data = np.take(data, index, axis=axis)
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path}: image has dtype {data.dtype}, expected a numeric (integer or float) array")
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (1, 3)) or min(data.shape[:2]) < 2:
        raise DataError(f"{path}: image has shape {data.shape}, expected H×W, H×W×1 or H×W×3 (a 3D volume is sliced) "
                        "with H and W at least 2")
    return np.ascontiguousarray(data)


def to_display(image: np.ndarray) -> np.ndarray:
    """Any image → H×W×3 uint8 (min-max), for overlays."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    img = (255 * (img - lo) / max(hi - lo, 1e-8)).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def write_mask_and_overlay(out_dir: str | os.PathLike, image: np.ndarray, mask: np.ndarray,
                           stem: str = "mask") -> tuple[Path, Path]:
    from PIL import Image

    from ..utils.atomic import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb = to_display(image).astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    rgb[mask] = 0.5 * rgb[mask] + 0.5 * red
    paths = (out / f"{stem}.png", out / f"{stem}_overlay.png")
    for path, arr in zip(paths, ((mask.astype(np.uint8) * 255), rgb.astype(np.uint8))):
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    return paths
