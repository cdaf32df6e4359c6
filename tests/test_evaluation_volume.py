"""3D evaluation protocol (evaluation/volume.py): Dice/NSD against hand-computed cases, click placement on the
worst slice, outputs, bad inputs, and `medico-peft evaluate --3d` end to end on a tiny volume and random model."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from medico_peft.errors import ConfigError, DataError
from medico_peft.evaluation import volume as ev


def _cubes():
    """Two 4³ cubes, the second shifted by 2 voxels along axis 0 (overlap 2×4×4 = 32 voxels)."""
    a = np.zeros((10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.zeros_like(a)
    b[4:8, 2:6, 2:6] = True
    return a, b


def test_dice_of_offset_cubes():
    a, b = _cubes()
    assert ev.dice_3d(a, b) == pytest.approx(2 * 32 / (64 + 64))
    assert ev.dice_3d(a, a) == 1.0
    assert ev.dice_3d(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert ev.dice_3d(a, np.zeros_like(a)) == 0.0


def test_nsd_of_offset_cubes_by_hand():
    """Each cube has 4³ - 2³ = 56 surface voxels. Distances of cube A's surface voxels to B's surface (1 mm voxels):
    the side rings (12 voxels per x layer) at x = 4, 5 lie on B's surface (0), at x = 3 one voxel away, at x = 2 two;
    the 2×2 face centres at x = 5 are 1 away, at x = 2 2 away. So 24 at 0, 16 at 1, 16 at 2; B is symmetric."""
    a, b = _cubes()
    assert ev.nsd(a, b, (1, 1, 1), 0.0) == pytest.approx(2 * 24 / 112)
    assert ev.nsd(a, b, (1, 1, 1), 1.0) == pytest.approx(2 * 40 / 112)
    assert ev.nsd(a, b, (1, 1, 1), 1.99) == pytest.approx(2 * 40 / 112)
    assert ev.nsd(a, b, (1, 1, 1), 2.0) == pytest.approx(1.0)
    # 2 mm along the shift axis: ring distances double (x = 3: 2 mm, x = 2: 4 mm); the x = 5 face centres are now
    # nearer B's side wall (1 mm in y/z) than its x = 4 face (2 mm); the x = 2 centres are 4 mm away.
    # -> 24 at 0, 4 at 1 mm, 12 at 2 mm, 16 at 4 mm.
    assert ev.nsd(a, b, (2, 1, 1), 0.5) == pytest.approx(2 * 24 / 112)
    assert ev.nsd(a, b, (2, 1, 1), 1.0) == pytest.approx(2 * 28 / 112)
    assert ev.nsd(a, b, (2, 1, 1), 2.0) == pytest.approx(2 * 40 / 112)
    assert ev.nsd(a, b, (2, 1, 1), 3.9) == pytest.approx(2 * 40 / 112)
    assert ev.nsd(a, b, (2, 1, 1), 4.0) == pytest.approx(1.0)


def test_nsd_edge_cases_and_symmetry():
    a, b = _cubes()
    empty = np.zeros_like(a)
    assert ev.nsd(empty, empty, (1, 1, 1), 1.0) == 1.0
    assert ev.nsd(a, empty, (1, 1, 1), 1.0) == 0.0
    assert ev.nsd(a, a, (1, 1, 1), 0.0) == 1.0
    assert ev.nsd(a, b, (1, 1.5, 0.7), 1.2) == pytest.approx(ev.nsd(b, a, (1, 1.5, 0.7), 1.2))
    # An object touching the volume's edge keeps its face there (the edge counts as outside).
    edge = np.zeros((4, 4, 4), bool)
    edge[:2] = True
    assert ev.surface_voxels(edge).sum() == 32


def test_nsd_matches_brute_force_pairwise_distances():
    rng = np.random.default_rng(0)
    from scipy.ndimage import binary_opening

    a = binary_opening(rng.random((12, 14, 9)) > 0.4)
    b = binary_opening(rng.random((12, 14, 9)) > 0.4)
    spacing = np.array([1.3, 0.8, 2.0])
    pa = np.argwhere(ev.surface_voxels(a)) * spacing
    pb = np.argwhere(ev.surface_voxels(b)) * spacing
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    for tol in (0.0, 0.9, 1.5, 3.0):
        want = ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(pa) + len(pb))
        assert ev.nsd(a, b, spacing, tol) == pytest.approx(want)


def test_start_slice_middle_largest_and_gap():
    gt = np.zeros((6, 12, 6), bool)
    gt[1:3, 2:11, 1:3] = True  # extent 2..10 along axis 1: middle 6
    gt[:, 9, :] = True  # largest cross-section at slice 9
    assert ev.start_slice_index(gt, 1, "middle") == 6
    assert ev.start_slice_index(gt, 1, "largest") == 9
    gap = np.zeros((6, 12, 6), bool)
    gap[2:4, 2:4, 2:4] = True
    gap[2:4, 9:11, 2:4] = True  # absent at the middle (6): the nearest slice holding it (3 and 9 tie: lower)
    assert ev.start_slice_index(gap, 1, "middle") == 3
    with pytest.raises(ConfigError, match="start_slice"):
        ev.start_slice_index(gt, 1, "first")


class FakeVolumePredictor:
    """Returns a fixed prediction on `segment`; `correct` sets the clicked slice to the truth. Records calls."""

    def __init__(self, pred, gt, axis):
        self.pred, self.gt, self.axis = pred.copy(), gt, axis
        self.calls = []

    def set_volume(self, volume, *, axis=0, spacing=(1.0, 1.0, 1.0), affine=None, intensity=None):
        assert axis == self.axis
        return self

    def segment(self, slice_index, *, box=None, points=None, labels=None, mask=None):
        self.calls.append(("segment", slice_index, box, points, labels))
        return self.pred.copy()

    def correct(self, slice_index, *, points=None, labels=None, box=None):
        self.calls.append(("correct", slice_index, points, labels))
        view, truth = np.moveaxis(self.pred, self.axis, 0), np.moveaxis(self.gt, self.axis, 0)
        view[slice_index] = truth[slice_index]
        return self.pred.copy()

    def encoded_slices(self):
        return 0


def _protocol_case():
    """Truth: a block on slices 2..9 along axis 1. Prediction errors: slice 5 misses a 5×5 block (25 FN),
    slice 7 misses 3×3 (9 FN) and has 2 FP, slice 3 has a 4×4 false positive block (16 FP) and 1 FN."""
    gt = np.zeros((16, 12, 16), bool)
    gt[2:14, 2:10, 2:14] = True
    pred = gt.copy()
    pred[4:9, 5, 6:11] = False     # slice 5: FN rows 4..8, cols 6..10 -> deepest pixel at (x=8, y=6)
    pred[3:6, 7, 3:6] = False      # slice 7: 9 FN
    pred[0:2, 7, 0] = True         # slice 7: 2 FP
    pred[12:16, 3, 14:16] = True   # slice 3: 8 FP ...
    pred[14:16, 3, 12:14] = True   # ... + 4 ...
    pred[15, 3, 10:12] = True      # ... + 2 = 14 FP
    pred[2, 3, 2] = False          # slice 3: 1 FN
    return gt, pred


def test_protocol_clicks_the_worst_slice_in_its_larger_error_region():
    gt, pred = _protocol_case()
    errors = ev.per_slice_counts(pred ^ gt, 1)
    assert errors.argmax() == 5 and errors[5] == 25 and errors[3] > errors[7]
    vp = FakeVolumePredictor(pred, gt, axis=1)
    trace = ev.run_volume_protocol(vp, gt, axis=1, spacing=(1, 1, 1), start="box", rounds=4)
    # start: the tight box of the truth on the middle slice of its extent 2..9 (5, the lower of 5 and 6)
    assert vp.calls[0][0] == "segment" and vp.calls[0][1] == 5
    assert vp.calls[0][2] == [2.0, 2.0, 13.0, 13.0]
    clicks = [(c.slice_index, c.xy, c.label) for c in trace.clicks]
    assert clicks[0] == (5, (8.0, 6.0), 1)          # 25 FN on slice 5: positive, centre of the missing block
    assert clicks[1][0] == 3 and clicks[1][2] == 0   # then slice 3: FP (14) > FN (1): negative ...
    x, y = clicks[1][1]
    assert not gt[int(y), 3, int(x)] and pred[int(y), 3, int(x)]  # ... inside the false positives
    assert clicks[2][0] == 7 and clicks[2][2] == 1   # slice 7: 9 FN > 2 FP: positive
    assert len(trace.clicks) == 3                    # perfect after 3 rounds: round 4 places no click
    assert trace.dice[0] < trace.dice[1] < trace.dice[2] < trace.dice[3] == trace.dice[4] == 1.0
    assert trace.nsd[-1] == 1.0 and len(trace.nsd) == 5
    assert [c[0] for c in vp.calls] == ["segment", "correct", "correct", "correct"]


def test_protocol_point_start_uses_the_deepest_pixel():
    gt, pred = _protocol_case()
    vp = FakeVolumePredictor(pred, gt, axis=1)
    ev.run_volume_protocol(vp, gt, axis=1, spacing=(1, 1, 1), start="point", start_slice="largest", rounds=0)
    kind, index, box, points, labels = vp.calls[0]
    assert index == 2 and box is None and labels == [1]  # all cross-sections tie: the first
    x, y = points[0]
    assert gt[int(y), 2, int(x)] and 5 <= x <= 10 and 5 <= y <= 10


def _image_and_objects():
    rng = np.random.default_rng(1)
    gt, pred = _protocol_case()
    image = rng.normal(size=gt.shape).astype(np.float32)
    other = np.zeros_like(gt)
    other[10:14, 9:11, 1:4] = True
    return image, gt, pred, {"block": gt, "small": other}


def test_evaluate_volume_writes_every_output(tmp_path):
    image, gt, pred, objects = _image_and_objects()
    vp = FakeVolumePredictor(pred, gt, axis=1)
    out = tmp_path / "eval3d"
    res = ev.evaluate_volume(vp, image, objects, axis=1, spacing=(1, 1, 1), rounds=3, out_dir=out, progress=False,
                             n_montages=2, volume_id="toy")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dice_vs_round.png", "montage_00.png", "montage_01.png", "per_object.csv", "summary.json",
                     "summary.md"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "per_object.csv")))
    assert [r["object"] for r in rows] == ["block", "small"]
    assert float(rows[0]["dice_3"]) == pytest.approx(res.rows[0]["dice_3"], abs=1e-6)
    assert rows[0]["clicks"].split()[0] == "5:8,6:+"
    summary = (out / "summary.md").read_text()
    assert "| block |" in summary and "**mean**" in summary and "NSD at 2 mm" in summary
    assert res.mean_dice[0] == pytest.approx(np.mean([r["dice_0"] for r in res.rows]))


def test_bad_inputs_one_clear_error_nothing_written(tmp_path):
    image, gt, pred, objects = _image_and_objects()
    out = tmp_path / "never"
    kw = dict(axis=1, rounds=1, out_dir=out, progress=False)
    vp = FakeVolumePredictor(pred, gt, axis=1)
    with pytest.raises(DataError, match=r"label grid \(16, 12, 15\) differs from the image grid \(16, 12, 16\)"):
        ev.evaluate_volume(vp, image, {"block": gt[..., :15]}, **kw)
    with pytest.raises(DataError, match="expected a 3D volume.*2D image"):
        ev.evaluate_volume(vp, image[:, 0], {"block": gt[:, 0]}, **kw)
    with pytest.raises(DataError, match="no voxel"):
        ev.evaluate_volume(vp, image, {"empty": np.zeros_like(gt)}, **kw)
    with pytest.raises(ConfigError, match="spacing"):
        ev.evaluate_volume(vp, image, objects, spacing=(1, 0, 1), **kw)
    with pytest.raises(ConfigError, match="rounds"):
        ev.evaluate_volume(vp, image, objects, **{**kw, "rounds": -1})
    assert not out.exists() and vp.calls == []


def _save_nifti(path, data, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_label_grid_differing_from_image_is_refused(tmp_path):
    image = _save_nifti(tmp_path / "img.nii.gz", np.zeros((8, 9, 10), np.float32))
    small = _save_nifti(tmp_path / "lab.nii.gz", np.zeros((8, 9, 9), np.uint8))
    with pytest.raises(DataError, match=r"lab\.nii\.gz: label grid \(8, 9, 9\) differs from the image grid"):
        ev.load_volume_pair(image, small)
    shifted = _save_nifti(tmp_path / "lab2.nii.gz", np.zeros((8, 9, 10), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(DataError, match="label affine differs"):
        ev.load_volume_pair(image, shifted)
    flat = _save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 9, 1, 2), np.float32))
    with pytest.raises(DataError, match="expected a 3D volume"):
        ev.load_volume_pair(flat, small)


def test_select_objects_merges_and_names():
    labels = np.zeros((4, 4, 4), np.int64)
    labels[0], labels[1], labels[2] = 1, 2, 3
    vol = ev.VolumeInput(np.zeros((4, 4, 4), np.float32), labels, (1, 1, 1), None,
                         {1: "Cerebelum_3_L", 2: "Cerebelum_4_5_L", 3: "Thalamus_L"}, "toy",
                         {"brain": labels > 0})
    objs = ev.select_objects(vol, ["cereb_L=Cerebelum_*_L", "3", "brain", "Thalamus_L+1"])
    assert list(objs) == ["cereb_L", "3", "brain", "Thalamus_L+1"]
    assert objs["cereb_L"].sum() == 32 and objs["3"].sum() == 16 and objs["brain"].sum() == 48
    assert objs["Thalamus_L+1"].sum() == 32
    assert list(ev.select_objects(vol, None)) == ["Cerebelum_3_L", "Cerebelum_4_5_L", "Thalamus_L", "brain"]
    with pytest.raises(ConfigError, match="matches no label"):
        ev.select_objects(vol, ["Putamen_*"])
    with pytest.raises(ConfigError, match="id 9"):
        ev.select_objects(vol, ["9"])


def _toy_volume(tmp_path):
    """24×24×10 volume: a bright 8×8×6 box (label 1) and a darker ball (label 2) on a noisy background."""
    rng = np.random.default_rng(0)
    img = rng.normal(20, 5, (24, 24, 10)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[3:11, 4:12, 2:8] = 1
    zz, yy, xx = np.meshgrid(np.arange(24), np.arange(24), np.arange(10), indexing="ij")
    lab[((zz - 17) ** 2 + (yy - 16) ** 2 + ((xx - 5) * 1.5) ** 2) <= 16] = 2
    img[lab == 1] += 150
    img[lab == 2] += 80
    (tmp_path / "names.txt").write_text("1 box\n2 ball\n")
    return (_save_nifti(tmp_path / "toy.nii.gz", img), _save_nifti(tmp_path / "toy_labels.nii.gz", lab),
            tmp_path / "names.txt")


def test_cli_evaluate_3d_on_a_tiny_volume(tmp_path, capsys):
    from medico_peft.cli import main

    image, labels, names = _toy_volume(tmp_path)
    out = tmp_path / "out3d"
    argv = ["evaluate", "--3d", "--image", str(image), "--label-volume", str(labels), "--label-names", str(names),
            "--model", "vit_tiny", "--rounds", "2", "--axis", "2", "--montages", "1", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "2 objects along axis 2" in said
    rows = list(csv.DictReader(open(out / "per_object.csv")))
    assert [r["object"] for r in rows] == ["box", "ball"]
    for r in rows:
        for i in range(3):
            assert 0.0 <= float(r[f"dice_{i}"]) <= 1.0 and 0.0 <= float(r[f"nsd_{i}"]) <= 1.0
    assert rows[0]["start_slice"] == "4"  # box on slices 2..7 along axis 2: middle = 4 (ties: the lower)
    assert (out / "montage_00.png").exists() and (out / "dice_vs_round.png").exists()
    # an existing output folder is refused without --overwrite, and kept as it was
    before = (out / "per_object.csv").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "per_object.csv").read_bytes() == before
    assert main([*argv[:-1], "--overwrite", "--labels", "box", "--no-progress"]) == 0
    assert [r["object"] for r in csv.DictReader(open(out / "per_object.csv"))] == ["box"]


def test_cli_evaluate_3d_grid_mismatch_writes_nothing(tmp_path, capsys):
    from medico_peft.cli import main

    image, _, _ = _toy_volume(tmp_path)
    wrong = _save_nifti(tmp_path / "wrong.nii.gz", np.zeros((24, 24, 9), np.uint8))
    out = tmp_path / "never"
    rc = main(["evaluate", "--3d", "--image", str(image), "--label-volume", str(wrong), "--model", "vit_tiny",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "label grid (24, 24, 9) differs from the image grid" in err
    assert not out.exists()
    rc = main(["evaluate", "--image", str(image), "--model", "vit_tiny", "--out", str(out)])
    assert rc == 2 and "need --3d" in capsys.readouterr().err and not out.exists()
