"""VolumePredictor: propagation reaches the object's ends and stops; corrections are local, reuse embeddings and
undo; the embedding cache is bounded; slices are batched on torch; onnxruntime and torch agree; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _volume_helpers import ThresholdBackend, ball, ball_volume, dice, extent
from medico_peft.data.prompts import mask_box
from medico_peft.errors import ConfigError, DataError
from medico_peft.models import load_model
from medico_peft.runtime import Predictor
from medico_peft.runtime.volume import VolumePredictor, segment_objects


def fake_vp(**kw) -> VolumePredictor:
    backend = ThresholdBackend(iou=kw.pop("iou", 0.9), neg_radius=kw.pop("neg_radius", 3.0))
    return VolumePredictor(Predictor(backend), **kw)


def middle_box(truth, axis):
    lo, hi = extent(truth, axis)
    k = (lo + hi) // 2
    return k, mask_box(np.take(truth, k, axis)).tolist()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_propagation_reaches_both_ends_of_the_ball_and_stops(axis):
    vol, truth = ball_volume()
    vp = fake_vp(min_area=1).set_volume(vol, axis=axis)  # the ball's end caps are single voxels
    k, box = middle_box(truth, axis)
    mask = vp.segment(k, box=box)
    assert mask.shape == vol.shape and mask.dtype == bool
    (lo, hi), (tlo, thi) = extent(mask, axis), extent(truth, axis)
    # the ends: at most the single-voxel cap of the ball is lost (the fake model's resize may drop it)
    assert tlo <= lo <= tlo + 1 and thi - 1 <= hi <= thi
    assert dice(mask, truth) > 0.95
    # it stopped: one empty slice decoded beyond each end, nothing further
    assert vp.decoded_slices == (hi - lo + 1) + (lo > 0) + (hi < vol.shape[axis] - 1)


def test_low_predicted_iou_stops_propagation():
    vol, truth = ball_volume()
    vp = fake_vp(iou=0.4, stop_iou=0.5, min_area=1).set_volume(vol, axis=0)
    k, box = middle_box(truth, 0)
    mask = vp.segment(k, box=box)
    assert extent(mask, 0) == (k, k)  # the prompted slice is kept, its neighbours scored too low
    vp.stop_iou = 0.3
    assert extent(vp.segment(k, box=box), 0) == extent(truth, 0)


def test_correction_is_local_reuses_embeddings_and_undo_restores():
    vol, truth = ball_volume()
    vp = fake_vp().set_volume(vol, axis=0)
    k, box = middle_box(truth, 0)
    before = vp.segment(k, box=box)
    encoded = vp.encoded_slices()
    c = k + 3
    after = vp.correct(c, points=[[17, 20]], labels=[0])  # a hole at the ball's axis on slice c
    changed = np.flatnonzero((after != before).any(axis=(1, 2)))
    assert changed.tolist() == [c]  # the neighbours agreed with their old result: propagation stopped there
    assert not after[c, 20, 17] and before[c, 20, 17]
    assert vp.encoded_slices() == encoded  # decoders only
    np.testing.assert_array_equal(vp.undo(), before)
    with pytest.raises(DataError, match="no correction to undo"):
        vp.undo()


def test_correction_that_removes_an_end_slice_clears_the_run_beyond_it():
    vol, truth = ball_volume(radius=5.0)
    vp = fake_vp(neg_radius=8.0).set_volume(vol, axis=0)
    k, box = middle_box(truth, 0)
    before = vp.segment(k, box=box)
    lo, hi = extent(before, 0)
    # a negative click covering the whole (small) cross-section two slices from the end
    after = vp.correct(hi - 1, points=[[17, 20]], labels=[0])
    assert not after[hi - 1].any() and not after[hi].any()
    np.testing.assert_array_equal(after[:hi - 1], before[:hi - 1])


def test_positive_click_beyond_the_end_extends_the_object_and_keeps_the_rest():
    vol = np.zeros((30, 40, 36), np.float32) + 20
    vol[5:15, 15:25, 10:20] = 220   # slices 5..14
    vol[16:25, 15:25, 10:20] = 220  # ... a dark slice 15, then 16..24: propagation from 8 stops at 15
    vp = fake_vp(stop_iou=0.0).set_volume(vol, axis=0)
    before = vp.segment(8, box=[10, 15, 19, 24])
    assert extent(before, 0) == (5, 14)
    after = vp.correct(20, points=[[14, 20]], labels=[1])
    reached = np.flatnonzero(after.any(axis=(1, 2))).tolist()
    assert reached == list(range(5, 15)) + list(range(16, 25))
    np.testing.assert_array_equal(after[:16], before[:16])
    np.testing.assert_array_equal(vp.undo(), before)


def test_cache_is_bounded_and_refills_when_a_correction_goes_far():
    vol, truth = ball_volume()
    vp = fake_vp(cache_slices=3).set_volume(vol, axis=0)
    k, box = middle_box(truth, 0)
    sizes = []
    orig = vp._embedding

    def spy(i, d=1):
        out = orig(i, d)
        sizes.append(len(vp._cache))
        return out

    vp._embedding = spy
    vp.segment(k, box=box)
    assert max(sizes) <= 3
    n = vp.encoded_slices()
    vp.correct(k, points=[[17, 20]], labels=[0])  # slice k left the 3-slice cache long ago
    assert vp.encoded_slices() > n


def test_torch_backend_encodes_slices_in_batches_with_the_same_embeddings():
    model = load_model("vit_tiny")
    predictor = Predictor.from_torch(model)
    calls = []
    enc = model.encode
    model.encode = lambda x: calls.append(x.shape[0]) or enc(x)
    vol, truth = ball_volume(shape=(12, 40, 36), centre=(6, 20, 17), radius=5)
    vp = VolumePredictor(predictor, stop_iou=0.0, min_area=1, batch_slices=4).set_volume(vol, axis=0)
    vp.segment(6, box=[10, 14, 24, 26])
    assert max(calls) > 1 and sum(calls) == vp.encoded_slices()
    i = next(iter(vp._cache))
    single = predictor.backend.encode(np.repeat(vp._slice_image(i)[..., None], 3, axis=2))
    torch.testing.assert_close(vp._cache[i], single, atol=1e-5, rtol=1e-4)


def test_isotropic_volume_gives_exactly_the_2d_predictor_answer_on_the_prompted_slice():
    vol, truth = ball_volume()
    vp = fake_vp(intensity=None) if False else fake_vp()
    vp.set_volume(vol, axis=2, intensity=None)
    k, box = middle_box(truth, 2)
    mask = vp.segment(k, box=box)
    p = Predictor(ThresholdBackend())
    direct = p.set_image(np.take(vol, k, 2)).predict(box=box).masks[0]
    np.testing.assert_array_equal(np.take(mask, k, 2), direct)


def test_anisotropic_slices_are_resampled_in_plane_and_mapped_back():
    spacing = (1.0, 1.0, 2.5)  # thick along axis 2: slicing along axis 0 gives 1 × 2.5 mm pixels
    shape = (24, 40, 16)
    truth = ball(shape, (12, 20, 8), 7.0, spacing)
    vol = (truth * 200.0 + 20).astype(np.float32)
    vp = fake_vp(min_area=1).set_volume(vol, axis=0, spacing=spacing)
    assert vp.resampled and vp.model_shape == (40, 40)
    k, box = middle_box(truth, 0)
    mask = vp.segment(k, box=box)
    assert extent(mask, 0) == extent(truth, 0) and dice(mask, truth) > 0.9
    iso = fake_vp().set_volume(vol, axis=2, spacing=spacing)  # in-plane 1 × 1 mm: no resampling
    assert not iso.resampled


def test_onnxruntime_and_torch_give_the_same_volume(tmp_path):
    pytest.importorskip("onnxruntime")
    from medico_peft.export.onnx_export import export_onnx

    model = load_model("vit_tiny")
    export_onnx(model, tmp_path / "onnx", parity_random=1, parity_real=0)
    vol, truth = ball_volume(shape=(10, 40, 36), centre=(5, 20, 17), radius=4)
    masks = []
    for predictor in (Predictor.from_torch(model), Predictor.from_onnx(tmp_path / "onnx", threads=1)):
        vp = VolumePredictor(predictor, stop_iou=0.0, min_area=1).set_volume(vol, axis=0)
        vp.segment(5, box=[12, 15, 22, 25])
        masks.append(vp.correct(6, points=[[17, 20]], labels=[1]))
    assert masks[0].any()
    assert (masks[0] != masks[1]).mean() < 1e-3


def test_segment_objects_gives_one_label_id_per_object():
    shape = (20, 40, 60)
    a, b = ball(shape, (10, 20, 15), 6.0), ball(shape, (10, 20, 45), 5.0)
    vol = ((a | b) * 200.0 + 20).astype(np.float32)
    vp = fake_vp(min_area=1).set_volume(vol, axis=0)
    labels = segment_objects(vp, [{"slice": 10, "box": mask_box(a[10]).tolist()},
                                  {"slice": 10, "box": mask_box(b[10]).tolist(), "id": 7}])
    assert labels.dtype == np.int16 and set(np.unique(labels)) == {0, 1, 7}
    assert dice(labels == 1, a) > 0.85 and dice(labels == 7, b) > 0.85  # the fake model's resize costs a rim
    assert not (labels == 1)[b].any() and not (labels == 7)[a].any()
    with pytest.raises(DataError, match=r"prompts\[1\]: slice: 99 is outside"):
        segment_objects(vp, [{"slice": 10, "box": [1, 1, 5, 5]}, {"slice": 99, "box": [1, 1, 5, 5]}])


@pytest.mark.parametrize("volume,kw,match", [
    (np.zeros((20, 20), np.float32), {}, "expected a 3D array, got 2D"),
    (np.zeros((4, 20, 20, 2), np.float32), {}, "expected a 3D array, got 4D"),
    (np.full((4, 8, 8), np.nan, np.float32), {}, "NaN"),
    (np.zeros((4, 8, 8), np.float32), {"spacing": (1, 0, 1)}, "spacing: expected 3 positive"),
    (np.zeros((4, 8, 8), np.float32), {"axis": 3}, "axis: expected 0, 1 or 2"),
])
def test_bad_volumes_are_clear_errors(volume, kw, match):
    with pytest.raises((DataError, ConfigError), match=match):
        fake_vp().set_volume(volume, **kw)


@pytest.mark.parametrize("call,match", [
    (lambda vp: vp.segment(24, box=[1, 1, 5, 5]), r"slice: 24 is outside the volume; axis 0 has 24 slices"),
    (lambda vp: vp.segment(-1, box=[1, 1, 5, 5]), "outside the volume"),
    (lambda vp: vp.segment(3, box=[1, 1, 36, 5]), r"box: .* reaches outside the slice; slice 3 \(axis 0\) is 36×40"),
    (lambda vp: vp.segment(3, box=[5, 1, 1, 5]), "x0 <= x1"),
    (lambda vp: vp.segment(3, points=[[1, 50]]), "lies outside the slice"),
    (lambda vp: vp.segment(3, points=[[1, 5]], labels=[2]), "expected 1 .* or 0"),
    (lambda vp: vp.segment(3), "no box, points or mask"),
    (lambda vp: vp.segment(3, mask=np.ones((5, 5), bool)), r"mask: shape \(5, 5\) differs from slice 3's \(40, 36\)"),
    (lambda vp: vp.correct(3), "no points and no box"),
])
def test_bad_prompts_are_clear_errors(call, match):
    vol, _ = ball_volume()
    vp = fake_vp().set_volume(vol, axis=0)
    with pytest.raises(DataError, match=match):
        call(vp)


def test_bad_options_and_missing_volume():
    with pytest.raises(ConfigError, match="prompt_mode"):
        fake_vp(prompt_mode="mask")
    with pytest.raises(ConfigError, match="cache_slices"):
        fake_vp(cache_slices=0)
    with pytest.raises(DataError, match="no volume set"):
        fake_vp().segment(0, box=[0, 0, 1, 1])


def test_a_user_mask_prompt_is_kept_on_its_slice_and_propagated():
    vol, truth = ball_volume()
    vp = fake_vp(min_area=1).set_volume(vol, axis=0)
    k = 12
    mask = vp.segment(k, mask=truth[k])
    np.testing.assert_array_equal(mask[k], truth[k])
    assert extent(mask, 0) == extent(truth, 0)


def _bar_and_late_neighbour():
    """Bar A on slices 5..25 and, 6 columns to its right, bar B on slices 10..25: a box around A carried slice
    to slice (margin 3) never reaches B; a box drawn around both on slice 22 carries A and B down to slice 10."""
    vol = np.zeros((30, 40, 36), np.float32) + 20
    vol[5:26, 15:25, 10:20] = 220
    vol[10:26, 15:25, 26:32] = 220
    return vol


@pytest.mark.parametrize("mode, first_changed", [("nearest", 16), ("to_anchor", 10)])
def test_a_correction_re_propagates_only_halfway_to_another_prompted_slice(mode, first_changed):
    vol = _bar_and_late_neighbour()
    vp = fake_vp(stop_iou=0.0, repropagate=mode).set_volume(vol, axis=0)
    before = vp.segment(8, box=[10, 15, 19, 24])
    assert extent(before, 0) == (5, 25) and not before[:, :, 26:].any()
    after = vp.correct(22, box=[10, 15, 31, 24])  # the user's box takes in B
    changed = np.flatnonzero((after != before).any(axis=(1, 2))).tolist()
    # slice 22 is 14 slices from the start slice 8: "nearest" re-propagates to slice 16 (6 away from 22, 8 from
    # 8) and slice 15 keeps the answer carried from 8; "to_anchor" carries B on until B ends (slice 10)
    assert changed == list(range(first_changed, 26))
    assert after[first_changed:26, 20, 28].all() and not after[:first_changed, :, 26:].any()


@pytest.mark.parametrize("mode, decoded", [("nearest", 1), ("to_anchor", 1), ("always", None)])
def test_a_correction_that_leaves_its_slice_unchanged_changes_nothing_else(mode, decoded):
    vol, truth = ball_volume()
    vp = fake_vp(repropagate=mode).set_volume(vol, axis=0)
    k, box = middle_box(truth, 0)
    before = vp.segment(k, box=box)
    n = vp.decoded_slices
    after = vp.correct(k + 2, points=[[2, 2]], labels=[0])  # a negative click on dark background: declined
    np.testing.assert_array_equal(after, before)
    if decoded is None:  # the old behaviour re-decodes neighbours (which settle here, so the mask agrees)
        assert vp.decoded_slices - n > 1
    else:
        assert vp.decoded_slices - n == decoded


def test_repropagate_must_be_a_known_mode():
    with pytest.raises(ConfigError, match="repropagate: 'far' should be one of nearest, to_anchor, always"):
        fake_vp(repropagate="far")
