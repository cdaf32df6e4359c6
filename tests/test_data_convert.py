"""Converter on synthetic data: formats, shard layout, splits, label selection, caps, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from medico_peft.cli import main as cli_main
from medico_peft.data import shard_format as F
from medico_peft.data.convert import convert
from medico_peft.data.dataset import SliceDataset
from medico_peft.data.labels import LabelSelection, read_label_names
from medico_peft.data.manifest import load_manifest
from medico_peft.data.pairing import pair_by_stem
from medico_peft.data.splits import SplitFractions, slab_split
from test_data_synthetic import make_nifti_dataset, make_volume, save_nifti

BLOSC_ID = "32001"  # HDF5's registered filter id of Blosc (hdf5plugin)


@pytest.fixture(scope="module")
def nifti_dirs(tmp_path_factory):
    return make_nifti_dataset(tmp_path_factory.mktemp("nifti"), n_volumes=5)


def _read_all(shard):
    with h5py.File(shard, "r") as f:
        return {k: f[k][:] for k in F.REQUIRED_KEYS}, dict(f.attrs)


def test_nifti_folder_roundtrip(nifti_dirs, tmp_path):
    report = convert(pair_by_stem(*nifti_dirs), tmp_path, size=64, progress=False)
    manifest = load_manifest(tmp_path, verify=True)
    assert manifest.image_size == 64 and manifest.modality == "mr" and manifest.normalization == "mr_percentile"
    assert report.total_samples == sum(e.n_samples for e in manifest.shards) > 0
    splits_of_volume = {}
    for entry in manifest.shards:
        data, attrs = _read_all(manifest.shard_path(entry))
        assert attrs["format_version"] == F.FORMAT_VERSION and attrs["image_size"] == 64
        assert data[F.IMAGES].dtype == np.uint8 and data[F.IMAGES].shape[1:] == (64, 64)
        assert data[F.LABELS].shape == data[F.IMAGES].shape
        # 40x48 slices: longest side 48 -> 64, so h = 53, w = 64; padding rows are 0
        assert (data[F.INPUT_SIZE] == [53, 64]).all() and (data[F.ORIGINAL_SIZE] == [40, 48]).all()
        assert not data[F.IMAGES][:, 53:].any() and not data[F.LABELS][:, 53:].any()
        assert np.allclose(data[F.SPACING], [1.0, 1.2])
        for vid in data[F.VOLUME_ID]:
            splits_of_volume.setdefault(vid, set()).add(entry.split)
        # stored boxes match the label map
        for lab, ids, boxes in zip(data[F.LABELS], data[F.OBJECT_IDS], data[F.OBJECT_BOXES]):
            assert sorted(ids) == sorted(set(np.unique(lab)) - {0})
            for i, (x0, y0, x1, y1) in zip(ids, boxes.reshape(-1, 4)):
                ys, xs = np.nonzero(lab == i)
                assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
        with h5py.File(manifest.shard_path(entry)) as f:
            # default filter: Blosc (HDF5 filter id 32001) with LZ4, one slice per chunk
            assert f[F.IMAGES].chunks == (1, 64, 64) and BLOSC_ID in f[F.IMAGES]._filters
    assert all(len(s) == 1 for s in splits_of_volume.values()), "a volume appears in two splits"
    assert {s for v in splits_of_volume.values() for s in v} == {"train", "val", "test"}
    assert manifest.label_names == {1: "label_1", 2: "label_2"}


def test_image_intensity_tracks_labels(nifti_dirs, tmp_path):
    convert(pair_by_stem(*nifti_dirs), tmp_path, size=48, split="train", min_area=0, progress=False)
    data, _ = _read_all(tmp_path / "train-00000.h5")
    fg = data[F.LABELS] > 0
    inner = data[F.IMAGES][fg].astype(float).mean()
    outer = data[F.IMAGES][(~fg) & (data[F.IMAGES] > 0)].astype(float).mean()
    assert inner > outer + 50  # the image pixels under a label are the bright ellipsoids


def test_empty_share_and_min_area(tmp_path):
    image, label = make_volume((30, 30, 20))
    label[..., 0][:2, :2] = 1  # a 4-pixel object on slice 0 -> dropped by min_area
    save_nifti(tmp_path / "a.nii.gz", image)
    save_nifti(tmp_path / "a_seg.nii.gz", label)
    pairs = [(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz")]
    fg = {k for k in range(20) if label[..., k].any()} - {0}
    none = convert(pairs, tmp_path / "o0", size=30, empty_share=0.0, min_area=5, split="train", progress=False)
    full = convert(pairs, tmp_path / "o1", size=30, empty_share=1.0, min_area=5, split="train", progress=False)
    assert none.samples["train"] == len(fg) and full.samples["train"] == 20
    data, _ = _read_all(tmp_path / "o1" / "train-00000.h5")
    assert not data[F.LABELS][data[F.SLICE_INDEX] == 0].any()


def test_slab_split_positions_and_gap():
    fg = list(range(10, 110))
    parts = slab_split(fg, SplitFractions(0.6, 0.0, 0.3), gap=5)
    train = [k for k, s in parts.items() if s == "train"]
    test = [k for k, s in parts.items() if s == "test"]
    assert (min(train), max(train), len(train)) == (10, 69, 60)
    assert (min(test), max(test), len(test)) == (80, 109, 30)
    assert min(test) - max(train) - 1 >= 5
    small = slab_split(list(range(20)), SplitFractions(0.6, 0.1, 0.3), gap=5)
    order = [small[k] for k in sorted(small)]
    assert order == sorted(order, key=["train", "val", "test"].index)
    for a, b in (("train", "val"), ("val", "test")):
        assert min(k for k in small if small[k] == b) - max(k for k in small if small[k] == a) - 1 >= 5


def test_slab_conversion_keeps_gap(tmp_path):
    image, label = make_volume((24, 24, 60), n_labels=1)
    label[..., 5:55] = np.maximum(label[..., 5:55], (np.arange(24)[:, None] > 12)[..., None] * 1)
    save_nifti(tmp_path / "v.nii.gz", image)
    save_nifti(tmp_path / "v_label.nii.gz", label)
    report = convert([(tmp_path / "v.nii.gz", tmp_path / "v_label.nii.gz")], tmp_path / "out", size=32,
                     split="slab", slab_gap=7, progress=False)
    idx = {}
    for split in ("train", "test"):
        data, _ = _read_all(tmp_path / "out" / f"{split}-00000.h5")
        idx[split] = data[F.SLICE_INDEX]
    assert report.samples["val"] == 0 and idx["test"].min() - idx["train"].max() - 1 >= 7


def test_label_selection_by_name(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("1 Thalamus_L 7101\n2 Thalamus_R 7102\n3 Caudate_L 7001\n\n")
    assert read_label_names(names) == {1: "Thalamus_L", 2: "Thalamus_R", 3: "Caudate_L"}
    m = LabelSelection(keep=["Thalamus*"], names_file=str(names)).resolve()
    assert m.names == {1: "Thalamus_L", 2: "Thalamus_R"}
    assert m.apply(np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 0]
    merged = LabelSelection(keep=["*"], merge={"Thalamus": ["Thalamus*"]}, rename={3: "caudate"},
                            names_file=str(names)).resolve()
    assert merged.names == {1: "Thalamus", 3: "caudate"}
    assert merged.apply(np.array([0, 1, 2, 3])).tolist() == [0, 1, 1, 3]
    open_map = LabelSelection(merge={9: [1, 2]}).resolve()
    assert open_map.apply(np.array([1, 2, 5])).tolist() == [9, 9, 5]


@pytest.mark.parametrize("kind", ["npy", "npz", "png", "tiff"])
def test_other_input_formats(tmp_path, kind):
    image, label = make_volume((32, 40, 6))
    imgs, labs = tmp_path / "i", tmp_path / "l"
    imgs.mkdir(), labs.mkdir()
    if kind == "npy":
        np.save(imgs / "v.npy", image), np.save(labs / "v.npy", label)
    elif kind == "npz":
        np.savez(imgs / "v.npz", image=image), np.savez(labs / "v.npz", label=label)
    elif kind == "png":
        Image.fromarray(np.clip(image[..., 3], 0, 255).astype(np.uint8)).save(imgs / "v.png")
        Image.fromarray(label[..., 3]).save(labs / "v_mask.png")
    else:
        import tifffile

        tifffile.imwrite(imgs / "v.tif", np.moveaxis(image, -1, 0))
        tifffile.imwrite(labs / "v.tif", np.moveaxis(label, -1, 0))
    report = convert(pair_by_stem(imgs, labs), tmp_path / "out", size=40, split="train", modality="other",
                     progress=False)
    expected = 1 if kind == "png" else sum(label[..., k].any() for k in range(6))
    assert report.samples["train"] == expected
    data, _ = _read_all(tmp_path / "out" / "train-00000.h5")
    assert (data[F.ORIGINAL_SIZE] == [32, 40]).all() and set(np.unique(data[F.LABELS])) <= {0, 1, 2}


def test_dicom_series(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image, label = make_volume((32, 32, 5))
    series = tmp_path / "imgs" / "ct1"
    series.mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    order = [3, 0, 4, 1, 2]  # files written out of order: the reader sorts by position
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(series / f"f{order.index(k)}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns = 32, 32
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.7, 0.7], 1, -1000
        ds.PixelData = (image[..., k] + 1000).astype(np.int16).tobytes()
        ds.save_as(str(series / f"f{order.index(k)}.dcm"), enforce_file_format=True)
    save_nifti(tmp_path / "labels" / "ct1.nii.gz", label)
    report = convert(pair_by_stem(tmp_path / "imgs", tmp_path / "labels"), tmp_path / "out", size=32,
                     modality="ct", split="train", progress=False)
    data, attrs = _read_all(tmp_path / "out" / "train-00000.h5")
    assert attrs["normalization"] == "ct_soft_tissue" and report.samples["train"] == data[F.IMAGES].shape[0]
    assert np.allclose(data[F.SPACING], [0.7, 0.7])
    for img, lab in zip(data[F.IMAGES], data[F.LABELS]):  # slices stay paired with their labels
        assert img[lab > 0].mean() > img[(lab == 0)].mean() + 40


def test_shard_caps_and_compression(nifti_dirs, tmp_path):
    pairs = pair_by_stem(*nifti_dirs)
    capped = convert(pairs, tmp_path / "n", size=64, split="train", max_samples_per_shard=7, progress=False)
    m = load_manifest(capped.manifest_path)
    assert all(e.n_samples <= 7 for e in m.shards) and len(m.shards) > 2
    by_mb = convert(pairs, tmp_path / "mb", size=64, split="train", max_shard_mb=0.05, progress=False)
    assert all(e.n_samples <= 7 for e in load_manifest(by_mb.manifest_path).shards)  # 0.05 MB / 12 KB = 5
    sizes, items = {}, {}
    for comp in ("none", "gzip", "lzf", "blosc-lz4", "blosc-zstd"):
        r = convert(pairs, tmp_path / comp, size=64, split="train", compression=comp, progress=False)
        mm = load_manifest(r.manifest_path)
        assert mm.compression == comp
        sizes[comp] = sum(e.bytes for e in mm.shards)
        with h5py.File(mm.shard_path(mm.shards[0])) as f:
            if comp.startswith("blosc"):
                assert BLOSC_ID in f[F.IMAGES]._filters and BLOSC_ID in f[F.LABELS]._filters
            else:
                assert f[F.IMAGES].compression == (None if comp == "none" else comp)
        ds = SliceDataset(r.manifest_path, split="train", augment=None, seed=0)
        items[comp] = [ds[i] for i in range(3)]
    assert all(sizes[c] < sizes["none"] for c in sizes if c != "none")
    for comp, got in items.items():  # every filter decodes to the same pixels and labels
        for a, b in zip(items["none"], got):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"]), comp


def test_blosc_shard_without_the_plugin_names_the_missing_filter(nifti_dirs, tmp_path):
    r = convert(pair_by_stem(*nifti_dirs), tmp_path / "b", size=64, split="train", progress=False)
    code = (
        "import sys; sys.modules['hdf5plugin'] = None\n"  # as if hdf5plugin were not installed
        "from medico_peft.data.dataset import SliceDataset\n"
        "from medico_peft.errors import DataError\n"
        "try:\n"
        f"    SliceDataset({str(r.manifest_path)!r}, split='train', augment=None)[0]\n"
        "except DataError as exc:\n"
        "    print('ERR', exc)\n"
    )
    env = {**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path / "no-plugins")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert "-00000.h5" in out.stdout and "hdf5plugin" in out.stdout


def test_parallel_matches_serial(nifti_dirs, tmp_path):
    pairs = pair_by_stem(*nifti_dirs)
    a = convert(pairs, tmp_path / "a", size=32, workers=0, progress=False)
    b = convert(pairs, tmp_path / "b", size=32, workers=2, progress=False)
    assert a.samples == b.samples
    for ea, eb in zip(load_manifest(a.manifest_path).shards, load_manifest(b.manifest_path).shards):
        da, _ = _read_all(tmp_path / "a" / ea.file)
        db, _ = _read_all(tmp_path / "b" / eb.file)
        assert np.array_equal(da[F.IMAGES], db[F.IMAGES]) and np.array_equal(da[F.LABELS], db[F.LABELS])


def test_reconvert_removes_stale_shards(nifti_dirs, tmp_path):
    pairs = pair_by_stem(*nifti_dirs)
    convert(pairs, tmp_path, size=32, split="train", max_samples_per_shard=3, progress=False)
    convert(pairs, tmp_path, size=32, split="train", progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["train-00000.h5"]


def test_cli_convert(nifti_dirs, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = cli_main(["convert", "--images", str(nifti_dirs[0]), "--labels", str(nifti_dirs[1]), "--modality", "mr",
                   "--size", "32", "--out", str(out), "--no-progress", "--keep", "1", "--rename", "1=blob"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    data = json.loads((out / "manifest.json").read_text())
    assert data["label_names"] == {"1": "blob"} and data["image_size"] == 32
    assert cli_main(["convert", "--out", str(out)]) == 2
    assert "--images" in capsys.readouterr().err


def test_label_dtype_widens_for_large_ids(tmp_path):
    image, label = make_volume((20, 20, 6))
    big = label.astype(np.uint16) * 150  # ids 150 and 300
    save_nifti(tmp_path / "a.nii.gz", image), save_nifti(tmp_path / "a_seg.nii.gz", label)
    save_nifti(tmp_path / "b.nii.gz", image), save_nifti(tmp_path / "b_seg.nii.gz", big)
    pairs = [(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz"), (tmp_path / "b.nii.gz", tmp_path / "b_seg.nii.gz")]
    report = convert(pairs, tmp_path / "out", size=20, split="train", progress=False)
    m = load_manifest(report.manifest_path)
    dtypes = [h5py.File(m.shard_path(e))[F.LABELS].dtype for e in m.shards]
    assert dtypes == [np.uint8, np.uint16] and set(m.label_names) == {1, 2, 150, 300}
