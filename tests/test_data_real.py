"""Real atlas data end to end: Colin27 + AAL (mricron-data) and MNI152 GM/WM (nilearn).

Checks alignment on real slices, not only shapes: labels must sit on brain tissue in the image.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import requires_mricron
from medico_peft.data.dataset import SliceDataset, iter_eval_slices
from medico_peft.data.manifest import load_manifest
from medico_peft.data.real_data import build_colin27_aal_shards, build_mni152_shards, colin27_paths, mni152_volumes
from medico_peft.data.resize import resize_labels


@pytest.fixture(scope="module")
def colin(tmp_path_factory):
    out = tmp_path_factory.mktemp("colin27")
    return build_colin27_aal_shards(out, size=256)


@requires_mricron
def test_colin27_aal_alignment(colin):
    manifest = load_manifest(colin.manifest_path, verify=True)
    assert len(manifest.label_names) == 116 and manifest.label_names[77] == "Thalamus_L"
    assert colin.samples["train"] > 0 and colin.samples["test"] > 0 and colin.samples["val"] == 0
    inside = total = 0
    for item in iter_eval_slices(colin.manifest_path, split="train"):
        image, labels = item["image"][0], item["label_map"]
        fg = labels > 0
        inside += int((image[fg] > 0.15).sum())  # background of ch2 is ~0 after percentile scaling
        total += int(fg.sum())
        assert item["original_size"] == (181, 217) and item["input_size"] == (214, 256)
    assert total > 100_000 and inside / total >= 0.99


@requires_mricron
def test_colin27_slab_gap_and_source_match(colin):
    slices = {s: [i["slice_index"] for i in iter_eval_slices(colin.manifest_path, split=s)] for s in ("train", "test")}
    assert min(slices["test"]) - max(slices["train"]) - 1 >= 5
    image_path, atlas_path, _ = colin27_paths()
    atlas = nib.load(str(atlas_path)).dataobj
    item = next(iter_eval_slices(colin.manifest_path, split="test"))
    k = item["slice_index"]
    expected = resize_labels(np.asarray(atlas[:, :, k]).astype(np.int64), 256, np.int64)
    stored = item["label_map"].numpy()
    agree = (stored == expected) | (stored == 0)  # min_area may zero tiny objects, nothing else
    assert agree.all() and (stored == expected).mean() > 0.99


@requires_mricron
def test_colin27_label_selection_and_loader(tmp_path):
    report = build_colin27_aal_shards(tmp_path, size=128, labels=["Thalamus*", "Caudate_L"])
    manifest = load_manifest(report.manifest_path)
    assert manifest.label_names == {71: "Caudate_L", 77: "Thalamus_L", 78: "Thalamus_R"}
    ds = SliceDataset(report.manifest_path, n_objects=3)
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and set(item["label_ids"].tolist()) <= {0, 71, 77, 78}
    for j in torch.nonzero(item["object_valid"]).flatten().tolist():
        mask = item["masks"][j].bool()
        assert item["image"][0][mask].mean() > 0.3  # deep grey matter is well above background


def test_mni152_gm_wm(tmp_path):
    pytest.importorskip("nilearn")
    template, labels = mni152_volumes()
    from nilearn import datasets

    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    assert set(np.unique(labels)) == {0, 1, 2} and not labels[~brain].any()
    report = build_mni152_shards(tmp_path, size=128)
    manifest = load_manifest(report.manifest_path, verify=True)
    assert manifest.label_names == {1: "grey_matter", 2: "white_matter"}
    brain_t = np.asarray(template.dataobj)
    n = 0
    for item in iter_eval_slices(report.manifest_path, split="train"):
        k = item["slice_index"]
        mask = resize_labels(brain[:, :, k].astype(np.int64), 128, np.int64) > 0
        fg = item["label_map"].numpy() > 0
        assert (fg & ~mask).sum() <= 0.01 * fg.sum()  # labels lie inside the brain mask
        expected = resize_labels(labels[:, :, k].astype(np.int64), 128, np.int64)
        assert ((item["label_map"].numpy() == expected) | (item["label_map"].numpy() == 0)).all()
        image = item["image"][0].numpy()
        wm, gm = item["label_map"].numpy() == 2, item["label_map"].numpy() == 1
        if wm.sum() > 200 and gm.sum() > 200:
            assert image[wm].mean() > image[gm].mean()  # T1: white matter brighter than grey
            n += 1
    assert n > 10 and brain_t.shape == (197, 233, 189)
