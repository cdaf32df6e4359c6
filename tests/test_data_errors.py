"""Bad inputs: one clear DataError naming the file (and key/sample), nothing half-written."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings

import h5py
import nibabel as nib
import numpy as np
import pytest

from medico_peft.data.convert import convert
from medico_peft.data.dataset import CorruptSampleError, SliceDataset
from medico_peft.data.manifest import load_manifest
from medico_peft.data.pairing import pair_by_stem
from medico_peft.errors import ConfigError, DataError
from test_data_synthetic import make_volume, save_nifti


def _pair(tmp_path, image, label, name="v"):
    img, lab = save_nifti(tmp_path / f"{name}.nii.gz", image), save_nifti(tmp_path / f"{name}_seg.nii.gz", label)
    return [(img, lab)]


def _assert_nothing_loadable(out):
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.h5")) and not list(out.glob(".*tmp"))


def test_shape_mismatch(tmp_path):
    image, label = make_volume((20, 20, 6))
    pairs = _pair(tmp_path, image, label[:, :19])
    with pytest.raises(DataError, match=r"v\.nii\.gz.*shape \(20, 20, 6\).*v_seg\.nii\.gz.*\(20, 19, 6\)"):
        convert(pairs, tmp_path / "out", progress=False)
    _assert_nothing_loadable(tmp_path / "out")


def test_missing_label(tmp_path):
    (tmp_path / "i").mkdir(), (tmp_path / "l").mkdir()
    save_nifti(tmp_path / "i" / "case7.nii.gz", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DataError, match=r"case7\.nii\.gz: no label file .* stem 'case7'"):
        pair_by_stem(tmp_path / "i", tmp_path / "l")
    with pytest.raises(DataError, match=r"nope\.nii\.gz: label file .* not found"):
        convert([(tmp_path / "i" / "case7.nii.gz", tmp_path / "nope.nii.gz")], tmp_path / "out", progress=False)


@pytest.mark.parametrize("bad, pattern", [
    (lambda l: l.astype(np.float32) + 0.5, "non-integer"),
    (lambda l: l.astype(np.int16) - 1, "negative value -1"),
])
def test_bad_label_values(tmp_path, bad, pattern):
    image, label = make_volume((20, 20, 6))
    with pytest.raises(DataError, match=rf"v_seg\.nii\.gz: label slice \d+ .*{pattern}"):
        convert(_pair(tmp_path, image, bad(label)), tmp_path / "out", progress=False)
    _assert_nothing_loadable(tmp_path / "out")


def test_nan_in_image(tmp_path):
    image, label = make_volume((20, 20, 6))
    image[5, 5, 3] = np.nan
    with pytest.raises(DataError, match=r"v\.nii\.gz: image slice 3 \(axis 2\) contains NaN/Inf"):
        convert(_pair(tmp_path, image, label), tmp_path / "out", empty_share=1.0, progress=False)
    _assert_nothing_loadable(tmp_path / "out")


def test_all_zero_labels_skip_with_warning(tmp_path):
    image, label = make_volume((20, 20, 6))
    pairs = _pair(tmp_path, image, label, "good") + _pair(tmp_path, image, np.zeros_like(label), "empty")
    with pytest.warns(UserWarning, match=r"empty_seg\.nii\.gz: no foreground"):
        report = convert(pairs, tmp_path / "out", split="train", progress=False)
    assert report.skipped_volumes and report.skipped_volumes[0].startswith("empty")
    assert load_manifest(report.manifest_path).splits["train"]["volumes"] == ["good"]


def test_truncated_nifti(tmp_path):
    image, label = make_volume((30, 30, 10))
    pairs = _pair(tmp_path, image, label)
    data = pairs[0][0].read_bytes()
    pairs[0][0].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"v\.nii\.gz: cannot read"):
        convert(pairs, tmp_path / "out", progress=False)
    _assert_nothing_loadable(tmp_path / "out")
    pairs[0][0].write_bytes(b"not a nifti at all")
    with pytest.raises(DataError, match=r"v\.nii\.gz: cannot read NIfTI"):
        convert(pairs, tmp_path / "out", progress=False)


def test_unsupported_type(tmp_path):
    (tmp_path / "scan.xyz").write_text("x")
    with pytest.raises(DataError, match=r"scan\.xyz: unsupported file type '.xyz'"):
        convert([(tmp_path / "scan.xyz", tmp_path / "scan.xyz")], tmp_path / "out", progress=False)


def test_bad_config_names_field(tmp_path):
    with pytest.raises(ConfigError, match="convert.compression"):
        convert([("a", "b")], tmp_path, compression="zstd")
    with pytest.raises(ConfigError, match="normalization"):
        convert([("a", "b")], tmp_path, normalization="ct_liver")


def test_crash_midway_leaves_nothing_loadable(tmp_path, monkeypatch):
    image, label = make_volume((20, 20, 8))
    pairs = _pair(tmp_path, image, label, "a") + _pair(tmp_path, image, label, "b")
    out = tmp_path / "out"
    convert(pairs, out, split="train", progress=False)  # an earlier, finished conversion
    from medico_peft.data import convert as conv

    real = conv.convert_volume

    def interrupted(image_path, *args):
        if "b" in image_path.name:
            raise KeyboardInterrupt
        yield from real(image_path, *args)

    monkeypatch.setattr(conv, "convert_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(pairs, out, split="train", max_samples_per_shard=2, progress=False)
    # The interrupted conversion leaves no partial set anywhere: the earlier, finished set is still the one
    # under `out` (its manifest, shards and checksums intact) and no staging or temporary files remain.
    assert not list(out.glob(".*tmp")) and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    old = SliceDataset(out)
    assert len(old) > 0


@pytest.fixture
def shards(tmp_path):
    image, label = make_volume((30, 30, 12))
    report = convert(_pair(tmp_path, image, label), tmp_path / "out", size=32, split="train", progress=False)
    return report.manifest_path


def test_checksum_mismatch(shards):
    shard = shards.parent / "train-00000.h5"
    with h5py.File(shard, "a") as f:
        f.attrs["modality"] = "ct"
    with pytest.raises(DataError, match=r"train-00000\.h5: sha256 .* does not match manifest"):
        SliceDataset(shards)
    assert len(SliceDataset(shards, verify=False)) > 0


def test_missing_shard_and_missing_key(shards):
    shard = shards.parent / "train-00000.h5"
    with h5py.File(shard, "a") as f:
        del f["object_boxes"]
    with pytest.raises(DataError, match=r"train-00000\.h5: shard is missing dataset 'object_boxes'"):
        SliceDataset(shards, verify=False)
    shard.unlink()
    with pytest.raises(DataError, match=r"manifest\.json: shard 'train-00000\.h5' listed in the manifest is missing"):
        SliceDataset(shards)


def test_corrupt_manifest(shards):
    data = json.loads(shards.read_text())
    del data["image_size"]
    shards.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: manifest key 'image_size' is missing"):
        load_manifest(shards)
    shards.write_text("{trunc")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(shards)


def test_truncated_h5(shards):
    shard = shards.parent / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"train-00000\.h5: cannot open shard"):
        SliceDataset(shards, verify=False)


def _corrupt_chunk(shard, row):
    with h5py.File(shard, "r") as f:
        info = f["images"].id.get_chunk_info(row)
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + 2)
        fh.write(b"\xff" * max(1, info.size - 4))


def test_corrupt_sample_raises_or_skips(shards):
    shard = shards.parent / "train-00000.h5"
    _corrupt_chunk(shard, 0)
    strict = SliceDataset(shards, verify=False, augment=None)
    with pytest.raises(CorruptSampleError, match=r"train-00000\.h5: sample 0 is unreadable"):
        strict[0]
    assert isinstance(CorruptSampleError("x"), DataError)
    lenient = SliceDataset(shards, verify=False, augment=None, skip_corrupt=True)
    item = lenient[0]
    assert item["image"].shape == (3, 32, 32) and len(lenient.skipped) == 1 and "sample 0" in lenient.skipped[0]


def test_large_volume_is_streamed_never_loaded_whole(tmp_path, monkeypatch):
    import tracemalloc

    shape = (256, 256, 160)  # 40 MB float32 + 10 MB labels; with a 1 MB limit both are streamed
    image, label = make_volume(shape)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "big.nii"))  # uncompressed: proxy slices
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "big_seg.nii"))
    del image, label

    small_image, small_label = make_volume((16, 16, 4))  # warm-up: imports must not count as data memory
    convert(_pair(tmp_path, small_image, small_label, "warm"), tmp_path / "warm", size=64, progress=False)

    def forbidden(*a, **k):
        raise AssertionError("whole-volume load")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", forbidden)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", forbidden)
    tracemalloc.start()
    report = convert([(tmp_path / "big.nii", tmp_path / "big_seg.nii")], tmp_path / "out", size=64,
                     split="train", max_in_memory_mb=1, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.samples["train"] > 0
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MB for a 50 MB image+label pair"
