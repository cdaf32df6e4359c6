"""Real atlas data that needs no download: Colin27 + AAL (Debian `mricron-data`) and nilearn's
MNI152 template with tissue labels. Two subjects, each split into slabs along the slicing axis.

MNI152 tissue labels come from nilearn's shipped masks: a voxel inside the brain mask and the GM
(WM) mask gets 1 (2); where both masks claim it (~0.6 M voxels at 1 mm) the larger of nilearn's
shipped GM/WM probability maps decides; CSF (3) is the rest of the brain mask (brain minus GM
minus WM). The whole brain (4) overlaps the three, so it is written as a second volume of the
same template (`mni152_brain`, beside `mni152_tissue`): one label map cannot hold both.

Slab split (`REAL_SLAB_FRACTIONS`, `REAL_SLAB_GAP`): along the foreground extent of each volume,
train = the lowest part, then a gap, val, then a gap, test = the highest 30 %. The test slab is
the one these builders wrote before the val slab existed (highest 30 %; train was the lowest
60 %), so test figures stay comparable; train gave up the slices val and its gap needed.

Object groups (`object_group`): objects an image can show (deep grey nuclei, cerebellum, tissue
classes) are `visible`; cortical and limbic AAL parcels, whose borders are atlas conventions
rather than image edges, are `cortical`. Evaluation reports a mean per group
(evaluation/report.py `group_means`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .convert import ConversionReport, convert
from .labels import LabelSelection

MRICRON_DIR = Path(os.environ.get("MEDICO_PEFT_MRICRON", "/usr/share/mricron/templates"))
MNI152_LABEL_NAMES = {1: "grey_matter", 2: "white_matter", 3: "csf", 4: "brain"}
MNI152_TISSUES = tuple(MNI152_LABEL_NAMES.values())
# train, val, test shares of each volume's labelled extent; test = the highest 30 % as before val existed.
REAL_SLAB_FRACTIONS = (0.5, 0.15, 0.3)
REAL_SLAB_GAP = 5

VISIBLE, CORTICAL = "visible", "cortical"
OBJECT_GROUPS = (VISIBLE, CORTICAL)
# AAL names (globs) of structures with image edges: deep grey nuclei and the cerebellum (hemispheres
# and vermis). Every other AAL label (cortex, cingulum, hippocampus, amygdala, ...) is cortical.
AAL_VISIBLE = ("Caudate_*", "Putamen_*", "Pallidum_*", "Thalamus_*", "Cerebelum_*", "Vermis_*")


def object_group(name: str) -> str | None:
    """`visible`, `cortical` or None (a name of neither built-in subject) for a label name."""
    from fnmatch import fnmatchcase

    if name in MNI152_LABEL_NAMES.values():
        return VISIBLE
    if any(fnmatchcase(name, pattern) for pattern in AAL_VISIBLE):
        return VISIBLE
    if _AAL_CORTICAL.match(name):
        return CORTICAL
    return None


# The other 82 AAL names: a region stem, optional sub-parts, a hemisphere suffix.
_AAL_CORTICAL = re.compile(
    r"^(Precentral|Postcentral|Frontal|Rolandic|Supp_Motor_Area|Olfactory|Rectus|Insula|Cingulum|Hippocampus|"
    r"ParaHippocampal|Amygdala|Calcarine|Cuneus|Lingual|Occipital|Fusiform|Parietal|SupraMarginal|Angular|"
    r"Precuneus|Paracentral_Lobule|Heschl|Temporal)(_[A-Za-z]+)*_[LR]$")


def _real_slab_options(options: dict) -> dict:
    options.setdefault("progress", False)
    if options.get("split", "slab") == "slab":
        options.setdefault("slab_fractions", REAL_SLAB_FRACTIONS)
        options.setdefault("slab_gap", REAL_SLAB_GAP)
    return options


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

    split="slab" (default): along the labelled extent on `axis` (axial by default), train = lowest
    50 %, val = the next 15 % after a 5-slice gap, test = highest 30 % (`REAL_SLAB_FRACTIONS`,
    `REAL_SLAB_GAP`; change with slab_fractions / slab_gap options).
    """
    image, atlas, names = colin27_paths()
    selection = LabelSelection(keep=list(labels) if labels else ["*"], names_file=str(names))
    options = _real_slab_options(dict(options, split=split))
    return convert([(image, atlas)], out_dir, labels=selection, modality="mr", size=size, axis=axis, **options)


def mni152_volumes(resolution: int = 1):
    """(template image, tissue label array uint8: 1 GM, 2 WM, 3 CSF, 0 outside the brain mask)
    from nilearn's shipped files (no download). The brain mask is `labels > 0`."""
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
    labels[brain & (labels == 0)] = 3  # CSF: brain minus grey matter minus white matter
    return template, labels


def build_mni152_shards(out_dir, size: int = 256, split: str = "slab", axis: int = 2, resolution: int = 1,
                        tissues: Sequence[str] = MNI152_TISSUES, **options) -> ConversionReport:
    """MNI152 template + tissue labels -> shards (inputs written to a temporary folder only).

    `tissues`: which of grey_matter (1), white_matter (2), csf (3), brain (4) to keep (default all).
    GM/WM/CSF share the volume `mni152_tissue`; brain is the volume `mni152_brain` (same image and
    brain extent, hence the same slabs). Slab split as for Colin27 (`REAL_SLAB_FRACTIONS`). For
    semantic (one class per pixel) training leave `brain` out: its slices repeat the tissue slices'
    images with another label map.
    """
    import nibabel as nib

    ids = {name: i for i, name in MNI152_LABEL_NAMES.items()}
    unknown = [t for t in tissues if t not in ids]
    if unknown or not tissues:
        raise DataError(f"tissues: {unknown or list(tissues)!r} not among {', '.join(MNI152_TISSUES)}")
    template, labels = mni152_volumes(resolution)
    options = _real_slab_options(dict(options, split=split))
    keep = sorted(ids[t] for t in tissues)
    with tempfile.TemporaryDirectory(prefix="mni152-") as tmp:
        image = nib.Nifti1Image(np.asarray(template.dataobj, np.float32), template.affine)
        pairs = []
        for name, volume in (("tissue", np.where(np.isin(labels, keep), labels, 0).astype(np.uint8)),
                             ("brain", np.where(labels > 0, 4, 0).astype(np.uint8) if 4 in keep else None)):
            if volume is None or not volume.any():
                continue
            image_path, label_path = Path(tmp) / f"mni152_{name}.nii.gz", Path(tmp) / f"mni152_{name}_labels.nii.gz"
            nib.save(image, image_path)
            nib.save(nib.Nifti1Image(volume, template.affine), label_path)
            pairs.append((image_path, label_path))
        selection = LabelSelection(keep=keep, rename={i: MNI152_LABEL_NAMES[i] for i in keep})
        return convert(pairs, out_dir, labels=selection, modality="mr", size=size, axis=axis, **options)


def slab_ranges(manifest_path) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{volume id: {split: (first slice index, last slice index, slices)}} of a slab-split shard set,
    read from the shards' per-sample metadata only (no image is decoded)."""
    import h5py

    from . import shard_format as F
    from .manifest import load_manifest

    manifest = load_manifest(manifest_path)
    F.register_filters()
    found: dict[str, dict[str, list[int]]] = {}
    for entry in manifest.shards:
        with h5py.File(Path(manifest.path).parent / entry.file, "r") as fh:
            volumes = [v.decode() if isinstance(v, bytes) else str(v) for v in fh[F.VOLUME_ID][()]]
            for volume, k in zip(volumes, fh[F.SLICE_INDEX][()].tolist()):
                found.setdefault(volume, {}).setdefault(entry.split, []).append(int(k))
    return {v: {s: (min(ks), max(ks), len(ks)) for s, ks in splits.items()} for v, splits in sorted(found.items())}


def describe_slabs(manifest_path) -> str:
    """One line per volume: `volume: train 10–81 (n slices), val …, test …` (for reports and results files)."""
    lines = []
    for volume, splits in slab_ranges(manifest_path).items():
        parts = [f"{s} {a}–{b} ({n} slices)" for s in ("train", "val", "test") if s in splits
                 for a, b, n in [splits[s]]]
        lines.append(f"{volume}: " + ", ".join(parts))
    return "\n".join(lines)
