"""Pair image files with label files.

Rules (in order): an explicit list of (image, label) pairs wins; otherwise each entry of the
images folder (a supported file, or a sub-folder = one DICOM series) is matched to the entry of the
labels folder with the same stem, where the label stem may also carry a `_label`, `_labels`,
`_seg`, `_mask` or `_gt` suffix, and an nnU-Net channel suffix `_0000` on the image is ignored.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DataError
from .readers import SUPPORTED, split_stem

LABEL_SUFFIXES = ("", "_label", "_labels", "_seg", "_mask", "_gt")


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or split_stem(p)[1] in SUPPORTED:
            out.append(p)
    return out


def pair_by_stem(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    images = _entries(images_dir)
    labels = {split_stem(p)[0]: p for p in _entries(labels_dir)}
    pairs = []
    for image in images:
        stem = split_stem(image)[0]
        base = stem[:-5] if stem.endswith("_0000") else stem
        candidates = [base + s for s in LABEL_SUFFIXES] + ([stem] if base != stem else [])
        match = next((labels[c] for c in candidates if c in labels), None)
        if match is None:
            raise DataError(
                f"{image}: no label file in {labels_dir} with stem {candidates[0]!r} "
                f"(also tried suffixes {', '.join(s for s in LABEL_SUFFIXES if s)})"
            )
        pairs.append((image, match))
    if not pairs:
        raise DataError(f"{images_dir}: no supported image files ({', '.join(SUPPORTED)}) or DICOM folders")
    return pairs


def read_pairs_file(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """CSV/TSV-free format: one `image,label` per line; relative paths are relative to the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: pairs file not found")
    pairs = []
    with open(path, newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise DataError(f"{path}: line {lineno} should be 'image,label', got {row!r}")
            pairs.append(tuple((path.parent / r.strip()) for r in row))
    return pairs
