"""Readers that turn NIfTI, NumPy, PNG/TIFF and DICOM inputs into a sliceable `Volume`.

Large volumes are never loaded whole: NIfTI stays behind nibabel's array proxy and `.npy` behind
a memory map, so the converter reads one slice at a time (`Volume.get_slice`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm",)
SUPPORTED = NIFTI_SUFFIXES + NUMPY_SUFFIXES + IMAGE_2D_SUFFIXES
IMAGE_NPZ_KEYS = ("image", "images", "img", "imgs", "data", "vol", "volume")
LABEL_NPZ_KEYS = ("label", "labels", "gt", "seg", "segmentation", "mask", "masks")
DEFAULT_MAX_IN_MEMORY_MB = 1024.0


def split_stem(path: str | os.PathLike) -> tuple[str, str]:
    """('case01', '.nii.gz') for 'case01.nii.gz'; a folder is a DICOM series with suffix ''."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + NUMPY_SUFFIXES + IMAGE_2D_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return (name, "") if Path(path).is_dir() else (Path(name).stem, Path(name).suffix.lower())


@dataclass
class Volume:
    """A 3D array-like (2D inputs get a trailing axis of length 1) plus voxel spacing."""

    path: Path
    data: object  # np.ndarray, np.memmap, nibabel ArrayProxy or _DicomSeries: anything sliceable
    spacing: tuple[float, float, float]
    streamed: bool  # True when `data` is read lazily per slice

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    def get_slice(self, axis: int, index: int) -> np.ndarray:
        key = [slice(None)] * 3
        key[axis] = index
        try:
            return np.asarray(self.data[tuple(key)])
        except DataError:
            raise
        except Exception as exc:  # zlib/EOF/OSError from a truncated or corrupt file
            raise DataError(f"{self.path}: cannot read slice {index} along axis {axis} ({type(exc).__name__}: {exc})") from None

    def in_plane_spacing(self, axis: int) -> tuple[float, float]:
        rest = [s for i, s in enumerate(self.spacing) if i != axis]
        return float(rest[0]), float(rest[1])


def _as_3d(path: Path, array, spacing) -> tuple[object, tuple[float, float, float]]:
    shape = array.shape
    if len(shape) == 4 and shape[3] == 1:
        array = array[..., 0] if isinstance(array, np.ndarray) else np.asarray(array)[..., 0]
        shape = array.shape
    if len(shape) == 2:
        array = np.asarray(array)[:, :, None]
    elif len(shape) != 3:
        raise DataError(f"{path}: expected a 2D or 3D array, got shape {tuple(shape)}")
    spacing = tuple(float(s) for s in (list(spacing) + [1.0, 1.0, 1.0])[:3])
    return array, spacing


def read_nifti(path: Path, max_in_memory_mb: float) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        nbytes = int(np.prod(proxy.shape)) * np.dtype(img.get_data_dtype()).itemsize
        streamed = nbytes > max_in_memory_mb * 2**20
        # np.asarray(dataobj) keeps the stored dtype (no float64 copy as get_fdata would make).
        data = proxy if streamed else np.asarray(proxy)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
    data, spacing = _as_3d(path, data, img.header.get_zooms())
    return Volume(path, data, spacing, streamed)


def _pick_npz_key(path: Path, keys: list[str], preferred: tuple[str, ...]) -> str:
    for key in preferred:
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise DataError(f"{path}: .npz holds {keys}; expected one array or a key among {list(preferred)}")


def read_numpy(path: Path, is_label: bool) -> Volume:
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, mmap_mode="r", allow_pickle=False)
            streamed = True
        else:
            with np.load(path, allow_pickle=False) as npz:
                key = _pick_npz_key(path, list(npz.keys()), LABEL_NPZ_KEYS if is_label else IMAGE_NPZ_KEYS)
                data = npz[key]
            streamed = False
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read NumPy file ({type(exc).__name__}: {exc})") from None
    data, spacing = _as_3d(path, data, (1.0, 1.0, 1.0))
    return Volume(path, data, spacing, streamed)


def read_image_2d(path: Path, is_label: bool) -> Volume:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            data = np.asarray(tifffile.imread(str(path)))
            if data.ndim == 3 and data.shape[-1] not in (3, 4):
                data = np.moveaxis(data, 0, -1)  # page stack (Z, H, W) -> (H, W, Z): slice axis 2
                return Volume(path, *_as_3d(path, data, (1.0, 1.0, 1.0)), streamed=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                data = np.asarray(im)
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        if is_label:
            raise DataError(f"{path}: label image has {data.shape[-1]} colour channels; expected one integer channel")
        data = data[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return Volume(path, *_as_3d(path, data, (1.0, 1.0, 1.0)), streamed=False)


class _DicomSeries:
    """Lazy (rows, cols, n_files) view of a DICOM folder: one file is read per slice along axis 2."""

    def __init__(self, path: Path):
        try:
            import pydicom
        except ImportError:
            raise DataError(
                f"{path}: reading DICOM needs pydicom; install the extra: pip install 'medico-peft[dicom]'"
            ) from None
        self._pydicom = pydicom
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        headers = []
        for f in files:
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            except Exception as exc:
                raise DataError(f"{f}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
            headers.append((f, ds))
        if not headers:
            raise DataError(f"{path}: DICOM folder holds no files")

        def position(item):
            ds = item[1]
            if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
                o = np.asarray(ds.ImageOrientationPatient, float)
                return float(np.dot(np.cross(o[:3], o[3:]), np.asarray(ds.ImagePositionPatient, float)))
            return float(getattr(ds, "InstanceNumber", 0))

        headers.sort(key=position)
        self.files = [f for f, _ in headers]
        first = headers[0][1]
        self.shape = (int(first.Rows), int(first.Columns), len(self.files))
        row, col = (float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
        gaps = np.diff([position(h) for h in headers])
        step = float(np.median(np.abs(gaps))) if len(gaps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
        self.spacing = (row, col, step or 1.0)

    def _read(self, k: int) -> np.ndarray:
        f = self.files[k]
        try:
            ds = self._pydicom.dcmread(str(f))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise DataError(f"{f}: cannot decode DICOM pixels ({type(exc).__name__}: {exc})") from None
        if pixels.shape != self.shape[:2]:
            raise DataError(f"{f}: slice shape {pixels.shape} differs from the series' {self.shape[:2]}")
        return pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)

    def __getitem__(self, key):
        if key[0] == slice(None) and key[1] == slice(None) and isinstance(key[2], (int, np.integer)):
            return self._read(int(key[2]))
        return np.stack([self._read(k) for k in range(self.shape[2])], axis=-1)[key]  # other axes: whole series


def read_dicom_series(path: Path) -> Volume:
    series = _DicomSeries(path)
    return Volume(path, series, series.spacing, streamed=True)


def read_volume(path: str | os.PathLike, is_label: bool = False,
                max_in_memory_mb: float = DEFAULT_MAX_IN_MEMORY_MB) -> Volume:
    """Open any supported input; raises DataError naming the file for missing/unsupported/corrupt ones."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {'label' if is_label else 'image'} file not found")
    if path.is_dir():
        return read_dicom_series(path)
    _, suffix = split_stem(path)
    readers: dict[tuple, Callable[[], Volume]] = {
        NIFTI_SUFFIXES: lambda: read_nifti(path, max_in_memory_mb),
        NUMPY_SUFFIXES: lambda: read_numpy(path, is_label),
        IMAGE_2D_SUFFIXES: lambda: read_image_2d(path, is_label),
    }
    for suffixes, reader in readers.items():
        if suffix in suffixes:
            return reader()
    raise DataError(
        f"{path}: unsupported file type '{suffix or path.name}'; expected one of {', '.join(SUPPORTED)} or a DICOM folder"
    )
