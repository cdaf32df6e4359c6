"""`medico-peft predict --volume`: mask.nii.gz on the input's grid (nibabel), DICOM series, several objects,
bad inputs refused with one clear error and nothing written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from _volume_helpers import ThresholdBackend, ball, dice
from medico_peft.cli import main
from medico_peft.data.prompts import mask_box
from medico_peft.errors import DataError
from medico_peft.runtime import Predictor
from medico_peft.workflows.volume_predict import (VolumeInput, check_same_grid, objects_from_args, predict_volume,
                                                  read_volume_input)

SHAPE = (40, 48, 20)
SPACING = (0.9, 0.9, 2.0)


def two_balls():
    a = ball(SHAPE, (14, 16, 10), 6.0, SPACING)
    b = ball(SHAPE, (28, 32, 10), 5.0, SPACING)
    return a, b, ((a | b) * 200.0 + 20).astype(np.float32)


def write_nifti(path, data, spacing=SPACING):
    affine = np.array([[-spacing[0], 0, 0, 30.0], [0, spacing[1], 0, -12.5], [0, 0, spacing[2], 7.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return img


def fake():
    return Predictor(ThresholdBackend())


def test_mask_nifti_has_the_input_grid_and_one_label_per_object(tmp_path):
    a, b, vol = two_balls()
    src = write_nifti(tmp_path / "vol.nii.gz", vol)
    k = 10  # slicing axis 2: slice pixels are (x = array axis 1, y = array axis 0)
    objects = objects_from_args([k], [mask_box(a[:, :, k]).tolist(), mask_box(b[:, :, k]).tolist()], None, None)
    summary = predict_volume(tmp_path / "vol.nii.gz", tmp_path / "pred", fake, objects, axis=2, min_area=1)
    out = nib.load(str(tmp_path / "pred" / "mask.nii.gz"))
    assert out.shape == SHAPE
    np.testing.assert_allclose(out.affine, src.affine)
    assert int(out.header["sform_code"]) == 4 and int(out.header["qform_code"]) == 1
    assert out.header.get_zooms()[:3] == pytest.approx(SPACING)
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.int16 and set(np.unique(labels)) == {0, 1, 2}
    assert dice(labels == 1, a) > 0.85 and dice(labels == 2, b) > 0.85
    assert not (labels == 1)[b].any()
    assert (tmp_path / "pred" / "montage.png").stat().st_size > 0
    assert summary["voxels"][1] == int((labels == 1).sum())


def test_cli_end_to_end_with_a_model(tmp_path, capsys):
    a, b, vol = two_balls()
    src = write_nifti(tmp_path / "vol.nii.gz", vol)
    box = mask_box(a[:, :, 10]).tolist()
    rc = main(["predict", "--model", "vit_tiny", "--image", str(tmp_path / "vol.nii.gz"), "--volume", "--slice", "10",
               "--box", *map(str, box), "--point", "16", "14", "--out", str(tmp_path / "pred")])
    assert rc == 0, capsys.readouterr().err
    out = nib.load(str(tmp_path / "pred" / "mask.nii.gz"))
    assert out.shape == SHAPE and np.allclose(out.affine, src.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    from PIL import Image

    with Image.open(tmp_path / "pred" / "montage.png") as im:
        assert im.mode == "RGB" and min(im.size) >= 20
    # the output exists now: refused without --overwrite, replaced with it
    argv = ["predict", "--model", "vit_tiny", "--image", str(tmp_path / "vol.nii.gz"), "--volume", "--slice", "10",
            "--box", *map(str, box), "--out", str(tmp_path / "pred")]
    before = (tmp_path / "pred" / "mask.nii.gz").read_bytes()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "pred" / "mask.nii.gz").read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0


def test_prompts_json_gives_one_label_per_object(tmp_path):
    a, b, vol = two_balls()
    write_nifti(tmp_path / "vol.nii.gz", vol)
    prompts = [{"slice": 10, "box": mask_box(b[:, :, 10]).tolist()},
               {"slice": 9, "points": [[16, 14]], "labels": [1]}]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    from medico_peft.workflows.volume_predict import load_prompts_file

    predict_volume(tmp_path / "vol.nii.gz", tmp_path / "pred", fake, load_prompts_file(tmp_path / "p.json"), axis=2,
                   min_area=1)
    labels = np.asarray(nib.load(str(tmp_path / "pred" / "mask.nii.gz")).dataobj)
    assert dice(labels == 1, b) > 0.85 and dice(labels == 2, a) > 0.85


def test_corrections_after_propagation_change_the_written_mask_as_the_volume_predictor_does(tmp_path):
    """A negative click on slice 12 of ball a (prompted with a box on slice 10) clears the clicked voxel in
    mask.nii.gz; re-propagation goes only halfway back to the prompted slice, so slices 0..10 keep the
    uncorrected answer (the stand-in decoder removes a disk around every negative click)."""
    a, b, vol = two_balls()
    write_nifti(tmp_path / "vol.nii.gz", vol)
    box = mask_box(a[:, :, 10]).tolist()
    plain = objects_from_args([10], [box], None, None)
    fixed = objects_from_args([10], [box], None, None, [[12, 16, 14, 0]])
    assert fixed[0]["corrections"] == [{"slice": 12, "points": [[16, 14]], "labels": [0]}]
    predict_volume(tmp_path / "vol.nii.gz", tmp_path / "plain", fake, plain, axis=2, min_area=1)
    predict_volume(tmp_path / "vol.nii.gz", tmp_path / "fixed", fake, fixed, axis=2, min_area=1)
    before = np.asarray(nib.load(str(tmp_path / "plain" / "mask.nii.gz")).dataobj)
    after = np.asarray(nib.load(str(tmp_path / "fixed" / "mask.nii.gz")).dataobj)
    assert before[14, 16, 12] == 1 and after[14, 16, 12] == 0
    assert after[:, :, 12].sum() < before[:, :, 12].sum()
    np.testing.assert_array_equal(after[:, :, :11], before[:, :, :11])


def test_prompts_file_corrections_are_checked_before_anything_is_written(tmp_path):
    a, b, vol = two_balls()
    write_nifti(tmp_path / "vol.nii.gz", vol)
    box = mask_box(a[:, :, 10]).tolist()
    for corrections, match in [({"slice": 3}, r"object 1\.corrections: expected a list"),
                               ([{"slice": 12, "points": [[16, 14]], "labels": [0], "radius": 3}],
                                r"object 1\.corrections\[0\]: unknown keys \['radius'\]"),
                               ([{"slice": 12}], r"object 1, correction 1: no box and no points on slice 12")]:
        with pytest.raises(DataError, match=match):
            predict_volume(tmp_path / "vol.nii.gz", tmp_path / "pred", fake,
                           [{"slice": 10, "box": box, "corrections": corrections}], axis=2, min_area=1)
        assert not (tmp_path / "pred").exists()


def test_correct_is_refused_outside_volume_mode_and_beside_a_prompts_file(tmp_path, capsys):
    write_nifti(tmp_path / "vol.nii.gz", two_balls()[2])
    (tmp_path / "p.json").write_text(json.dumps([{"slice": 10, "box": [1, 1, 5, 5]}]))
    base = ["predict", "--model", "vit_tiny", "--image", str(tmp_path / "vol.nii.gz"), "--out", str(tmp_path / "o")]
    assert main(base + ["--volume", "--prompts", str(tmp_path / "p.json"), "--correct", "9", "3", "3", "0"]) == 2
    assert "give an object's clicks in its \"corrections\" list" in capsys.readouterr().err
    assert main(base + ["--box", "1", "1", "5", "5", "--correct", "9", "3", "3", "0"]) == 2
    assert "--correct: only with --volume" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def write_dicom_series(folder, vol, spacing, origin=(-20.0, -30.0, 5.0)):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    order = np.random.default_rng(0).permutation(vol.shape[2])  # files named out of order on purpose
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{n:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, \
            meta.MediaStorageSOPInstanceUID, series
        ds.Modality = "MR"
        ds.Rows, ds.Columns = vol.shape[:2]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.InstanceNumber = int(k) + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"im{n:03d}.dcm"), enforce_file_format=True)


def test_dicom_series_works_the_same(tmp_path):
    a, b, vol = two_balls()
    write_dicom_series(tmp_path / "series", vol, SPACING)
    vin = read_volume_input(tmp_path / "series")
    np.testing.assert_array_equal(vin.data, vol.astype(np.uint16).astype(np.float32))
    assert vin.spacing == pytest.approx(SPACING)
    # DICOM LPS → RAS: row index runs along +y (posterior) → -y in RAS; columns along +x (left) → -x
    want = np.array([[0, -SPACING[1], 0, 20.0], [-SPACING[0], 0, 0, 30.0], [0, 0, SPACING[2], 5.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(vin.affine, want)
    objects = [{"slice": 10, "box": mask_box(a[:, :, 10]).tolist()}]
    predict_volume(tmp_path / "series", tmp_path / "pred", fake, objects, axis=2, min_area=1)
    out = nib.load(str(tmp_path / "pred" / "mask.nii.gz"))
    np.testing.assert_allclose(out.affine, want)
    assert dice(np.asarray(out.dataobj) == 1, a) > 0.85


@pytest.mark.parametrize("make,args,match", [
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), str(p)), ["--slice", "1"],
     "a 2D image .* given to --volume"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(p)), ["--slice", "1"],
     r"4D input \(shape \(8, 8, 8, 3\)\)"),
    (None, ["--slice", "20"], r"slice: 20 is outside the volume; axis 2 has 20 slices"),
    (None, ["--slice", "5", "--box", "1", "1", "60", "5"], r"box: .* reaches outside the slice; slice 5 \(axis 2\) is 48×40"),
    (None, ["--slice", "5", "--axis", "3"], "axis: expected 0, 1 or 2"),
    (None, ["--box", "1", "1", "5", "5"], "--slice: --volume needs"),
    (None, ["--slice", "5", "--correct", "20", "3", "3", "0"],
     r"object 1, correction 1: slice: 20 is outside the volume; axis 2 has 20 slices"),
    (None, ["--slice", "5", "--correct", "6", "3", "3", "2"], r"--correct: expected SLICE X Y LABEL .* got 6 3 3 2"),
    (None, ["--slice", "5", "--correct", "6", "99", "3", "0"], r"object 1, correction 1: .*outside"),
])
def test_bad_inputs_are_one_clear_error_and_nothing_is_written(tmp_path, capsys, make, args, match):
    path = tmp_path / "vol.nii.gz"
    if make is None:
        write_nifti(path, two_balls()[2])
    else:
        make(path)
    argv = ["predict", "--model", "vit_tiny", "--image", str(path), "--volume", "--out", str(tmp_path / "pred")]
    if not any(a == "--box" for a in args):
        args = [*args, "--box", "1", "1", "5", "5"]
    rc = main(argv + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "pred").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.nii.gz"]


def test_label_volume_on_another_grid_is_refused(tmp_path):
    vol = two_balls()[2]
    write_nifti(tmp_path / "vol.nii.gz", vol)
    write_nifti(tmp_path / "lab.nii.gz", np.zeros(SHAPE, np.int16), spacing=(1.0, 1.0, 2.0))
    write_nifti(tmp_path / "small.nii.gz", np.zeros((10, 10, 10), np.int16))
    image = read_volume_input(tmp_path / "vol.nii.gz")
    with pytest.raises(DataError, match="affine differs"):
        check_same_grid(image, read_volume_input(tmp_path / "lab.nii.gz"))
    with pytest.raises(DataError, match=r"shape \(10, 10, 10\) differs"):
        check_same_grid(image, read_volume_input(tmp_path / "small.nii.gz"))
    check_same_grid(image, VolumeInput(tmp_path / "same", np.zeros(SHAPE), SPACING, image.affine, None))
