"""Real atlas data that needs no download: Colin27 + AAL (Debian `mricron-data`) and nilearn's
MNI152 template with a grey/white-matter label map.

MNI152 labels (1 = grey matter, 2 = white matter) come from nilearn's shipped masks: a voxel
inside the brain mask and the GM (WM) mask gets 1 (2); where both masks claim it (~0.6 M voxels
at 1 mm) the larger of nilearn's shipped GM/WM probability maps decides.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .convert import ConversionReport, convert
from .labels import LabelSelection

MRICRON_DIR = Path(os.environ.get("MEDICO_PEFT_MRICRON", "/usr/share/mricron/templates"))
MNI152_LABEL_NAMES = {1: "grey_matter", 2: "white_matter"}


def colin27_paths() -> tuple[Path, Path, Path]:
    """(ch2.nii.gz, aal.nii.gz, aal.nii.txt); DataError with the install hint when missing."""
    paths = tuple(MRICRON_DIR / n for n in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt"))
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: not found; install Debian package mricron-data (apt-get install mricron-data)")
    return paths


def build_colin27_aal_shards(out_dir, size: int = 256, labels: Sequence[str | int] | None = None,
                             split: str = "slab", axis: int = 2, **options) -> ConversionReport:
    """Colin27 T1 + AAL atlas -> shards. `labels`: AAL names/globs or ids to keep (default all 116).

    split="slab" (default): train = lowest 60 % of the labelled extent along `axis` (axial by
    default), test = highest 30 %, 5-slice gap; change with slab_fractions / slab_gap options.
    """
    image, atlas, names = colin27_paths()
    selection = LabelSelection(keep=list(labels) if labels else ["*"], names_file=str(names))
    options.setdefault("progress", False)
    return convert([(image, atlas)], out_dir, labels=selection, modality="mr", size=size,
                   split=split, axis=axis, **options)


def mni152_volumes(resolution: int = 1):
    """(template image, GM/WM label array uint8) from nilearn's shipped files (no download)."""
    try:
        from nilearn import datasets
    except ImportError:
        raise DataError("nilearn: not installed; install the extra: pip install 'medico-peft[data]'") from None
    template = datasets.load_mni152_template(resolution=resolution)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    gm = np.asarray(datasets.load_mni152_gm_mask(resolution=resolution).dataobj) > 0
    wm = np.asarray(datasets.load_mni152_wm_mask(resolution=resolution).dataobj) > 0
    gm_p = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj)
    wm_p = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj)
    labels = np.zeros(brain.shape, np.uint8)
    labels[gm & brain] = 1
    labels[wm & brain] = 2
    both = gm & wm & brain
    labels[both] = np.where(gm_p[both] >= wm_p[both], 1, 2)
    return template, labels


def build_mni152_shards(out_dir, size: int = 256, split: str = "slab", axis: int = 2, resolution: int = 1,
                        **options) -> ConversionReport:
    """MNI152 template + GM(1)/WM(2) labels -> shards (inputs written to a temporary folder only)."""
    import nibabel as nib

    template, labels = mni152_volumes(resolution)
    options.setdefault("progress", False)
    with tempfile.TemporaryDirectory(prefix="mni152-") as tmp:
        image_path, label_path = Path(tmp) / "mni152.nii.gz", Path(tmp) / "mni152_gmwm.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(template.dataobj, np.float32), template.affine), image_path)
        nib.save(nib.Nifti1Image(labels, template.affine), label_path)
        selection = LabelSelection(keep=[1, 2], rename=MNI152_LABEL_NAMES)
        return convert([(image_path, label_path)], out_dir, labels=selection, modality="mr", size=size,
                       split=split, axis=axis, **options)
