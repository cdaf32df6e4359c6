"""Real atlas data end to end: Colin27 + AAL (mricron-data) and MNI152 tissues (nilearn).

Checks alignment on real slices, not only shapes: labels must sit on brain tissue in the image.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import mricron_available, requires_mricron
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
    assert colin.samples["train"] > 0 and colin.samples["test"] > 0 and colin.samples["val"] > 0
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
    slices = {s: [i["slice_index"] for i in iter_eval_slices(colin.manifest_path, split=s)]
              for s in ("train", "val", "test")}
    assert min(slices["val"]) - max(slices["train"]) - 1 >= 5 and min(slices["test"]) - max(slices["val"]) - 1 >= 5
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


def test_mni152_tissues(tmp_path):
    pytest.importorskip("nilearn")
    template, labels = mni152_volumes()
    from nilearn import datasets

    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    gm = np.asarray(datasets.load_mni152_gm_mask(resolution=1).dataobj) > 0
    wm = np.asarray(datasets.load_mni152_wm_mask(resolution=1).dataobj) > 0
    assert set(np.unique(labels)) == {0, 1, 2, 3} and not labels[~brain].any() and (labels[brain] > 0).all()
    np.testing.assert_array_equal(labels == 3, brain & ~gm & ~wm)  # CSF = brain minus GM minus WM
    assert ((labels == 1) <= gm).all() and ((labels == 2) <= wm).all()
    report = build_mni152_shards(tmp_path, size=128, tissues=("grey_matter", "white_matter"))
    manifest = load_manifest(report.manifest_path, verify=True)
    assert manifest.label_names == {1: "grey_matter", 2: "white_matter"}
    brain_t = np.asarray(template.dataobj)
    n = 0
    for item in iter_eval_slices(report.manifest_path, split="train"):
        k = item["slice_index"]
        mask = resize_labels(brain[:, :, k].astype(np.int64), 128, np.int64) > 0
        fg = item["label_map"].numpy() > 0
        assert (fg & ~mask).sum() <= 0.01 * fg.sum()  # labels lie inside the brain mask
        gmwm = np.where(np.isin(labels[:, :, k], [1, 2]), labels[:, :, k], 0)
        expected = resize_labels(gmwm.astype(np.int64), 128, np.int64)
        assert ((item["label_map"].numpy() == expected) | (item["label_map"].numpy() == 0)).all()
        image = item["image"][0].numpy()
        wm_s, gm_s = item["label_map"].numpy() == 2, item["label_map"].numpy() == 1
        if wm_s.sum() > 200 and gm_s.sum() > 200:
            assert image[wm_s].mean() > image[gm_s].mean()  # T1: white matter brighter than grey
            n += 1
    assert n > 10 and brain_t.shape == (197, 233, 189)


def _slices(manifest_path, split):
    out = {}
    for item in iter_eval_slices(manifest_path, split=split):
        out.setdefault(item["volume_id"], []).append((item["slice_index"], item["label_map"].numpy()))
    return out


def test_mni152_four_class_shards_slabs_and_brain_volume(tmp_path):
    pytest.importorskip("nilearn")
    report = build_mni152_shards(tmp_path, size=64)
    manifest = load_manifest(report.manifest_path, verify=True)
    assert manifest.label_names == {1: "grey_matter", 2: "white_matter", 3: "csf", 4: "brain"}
    per_split = {s: _slices(report.manifest_path, s) for s in ("train", "val", "test")}
    for volume, ids in (("mni152_tissue", {1, 2, 3}), ("mni152_brain", {4})):
        idx = {s: [k for k, _ in per_split[s][volume]] for s in per_split}
        assert all(idx.values()), idx
        assert max(idx["train"]) + 5 < min(idx["val"]) and max(idx["val"]) + 5 < min(idx["test"])  # gaps of 5
        seen = set().union(*(set(np.unique(lab)) for s in per_split for _, lab in per_split[s][volume]))
        assert seen - {0} == ids
    from medico_peft.data.real_data import describe_slabs, slab_ranges

    ranges = slab_ranges(report.manifest_path)  # metadata only, as read through the loader above
    for volume in ("mni152_tissue", "mni152_brain"):
        for split, items in per_split.items():
            ks = [k for k, _ in items[volume]]
            assert ranges[volume][split] == (min(ks), max(ks), len(ks))
    assert describe_slabs(report.manifest_path).splitlines()[0].startswith("mni152_brain: train ")
    for split in per_split:  # same slabs; the brain label is the union of the tissue labels on every slice
        tissue, brain = dict(per_split[split]["mni152_tissue"]), dict(per_split[split]["mni152_brain"])
        assert sorted(tissue) == sorted(brain)
        for k in tissue:
            assert ((tissue[k] > 0) == (brain[k] > 0)).mean() > 0.995
    # CSF objects survive min_area (at 64² only in the lower slabs; at 256² in 44 test slices too)
    assert any((lab == 3).any() for _, lab in per_split["train"]["mni152_tissue"])


def test_val_slab_leaves_the_test_slab_where_it_was(tmp_path):
    """The test slices are those of the old split (train 60 %, no val, test 30 %), for MNI152 GM/WM."""
    pytest.importorskip("nilearn")
    gmwm = ("grey_matter", "white_matter")
    new = build_mni152_shards(tmp_path / "new", size=64, tissues=gmwm)
    old = build_mni152_shards(tmp_path / "old", size=64, tissues=gmwm, slab_fractions=(0.6, 0.0, 0.3))
    test = lambda r: [i["slice_index"] for i in iter_eval_slices(r.manifest_path, split="test")]  # noqa: E731
    assert test(new) == test(old) and len(test(new)) > 30
    assert old.samples["val"] == 0 and new.samples["val"] > 0 and new.samples["train"] < old.samples["train"]


@requires_mricron
@pytest.mark.slow
def test_colin27_test_slab_is_unchanged_by_the_val_slab(colin, tmp_path):
    old = build_colin27_aal_shards(tmp_path, size=256, slab_fractions=(0.6, 0.0, 0.3))
    test = lambda r: [i["slice_index"] for i in iter_eval_slices(r.manifest_path, split="test")]  # noqa: E731
    assert test(colin) == test(old)


def test_object_groups_split_aal_into_visible_and_cortical():
    from medico_peft.data.labels import read_label_names
    from medico_peft.data.real_data import CORTICAL, VISIBLE, object_group

    for name in ("Thalamus_L", "Caudate_R", "Putamen_L", "Pallidum_R", "Cerebelum_Crus1_L", "Cerebelum_10_R",
                 "Vermis_4_5", "grey_matter", "white_matter", "csf", "brain"):
        assert object_group(name) == VISIBLE, name
    for name in ("Precentral_L", "Frontal_Sup_Orb_R", "Supp_Motor_Area_L", "Hippocampus_R", "Amygdala_L",
                 "Temporal_Pole_Mid_R", "Paracentral_Lobule_L", "Cingulum_Post_R"):
        assert object_group(name) == CORTICAL, name
    assert object_group("liver") is None and object_group("Thalamus") is None and object_group("label_7") is None
    if mricron_available():
        names = read_label_names(colin27_paths()[2]).values()
        groups = [object_group(n) for n in names]
        assert len(groups) == 116 and groups.count(VISIBLE) == 34 and groups.count(CORTICAL) == 82


def test_convert_builtin_uses_the_real_data_slabs_unless_told_otherwise(tmp_path, capsys):
    pytest.importorskip("nilearn")
    from medico_peft.cli import main

    args = ["convert", "--builtin", "mni152", "--size", "64", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--slab-fractions", "0.6,0,0.3"]) == 0
    a, b = (load_manifest(tmp_path / n / "manifest.json") for n in "ab")
    assert a.splits["val"]["n_samples"] > 0 and b.splits["val"]["n_samples"] == 0
    assert a.splits["test"]["n_samples"] == b.splits["test"]["n_samples"]
    assert a.config["slab_fractions"] == {"train": 0.5, "val": 0.15, "test": 0.3} and a.config["slab_gap"] == 5
