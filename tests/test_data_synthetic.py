"""Synthetic volumes shared by the data tests (imported as a module; holds no tests itself)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def make_volume(shape=(40, 48, 16), seed=0, n_labels=2):
    """Image with bright ellipsoids whose label ids are 1..n_labels; intensity follows the labels."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    for i in range(1, n_labels + 1):
        c = [s * (0.3 + 0.4 * (i - 1) / max(n_labels - 1, 1)) for s in shape]
        r = [max(2.0, s * 0.18) for s in shape]
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
        label[inside] = i
    image = (100.0 + 200.0 * label + rng.normal(0, 5, shape)).astype(np.float32)
    return image, label


def save_nifti(path: Path, array, spacing=(1.0, 1.0, 1.0)) -> Path:
    affine = np.diag(list(spacing) + [1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def make_nifti_dataset(root: Path, n_volumes=4, shape=(40, 48, 16), spacing=(1.0, 1.2, 2.0)):
    """root/imgs/case{i}.nii.gz + root/labels/case{i}.nii.gz; returns the two folders."""
    imgs, labs = root / "imgs", root / "labels"
    imgs.mkdir(parents=True, exist_ok=True)
    labs.mkdir(parents=True, exist_ok=True)
    for i in range(n_volumes):
        image, label = make_volume(shape, seed=i)
        save_nifti(imgs / f"case{i}.nii.gz", image, spacing)
        save_nifti(labs / f"case{i}.nii.gz", label, spacing)
    return imgs, labs
