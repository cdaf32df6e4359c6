"""The interactive protocol's mechanics, with scripted segmenters whose answers are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medico_peft.errors import ConfigError
from medico_peft.evaluation.interactive import object_center, resolve_labels, run_protocol, tight_box
from medico_peft.evaluation.segmenter import Segmenter, TorchSegmenter, as_segmenter

S = 32


class BoxAndClicks:
    """Fills the box, adds a 5×5 blob per positive click and removes one per negative click.

    Records every call so the test can check what the protocol sent (points, mask inputs).
    """

    img_size = S

    def __init__(self, multimask_iou=None):
        self.calls = []
        self.multimask_iou = multimask_iou

    def embed(self, image):
        return image

    def predict(self, emb, points, point_labels, boxes, mask_input, multimask):
        self.calls.append(dict(points=points, labels=point_labels, boxes=boxes, mask_input=mask_input,
                               multimask=multimask))
        k = (boxes if boxes is not None else points).shape[0]
        logits = torch.full((k, 1, S, S), -5.0)
        for j in range(k):
            if boxes is not None:
                x0, y0, x1, y1 = boxes[j].long().tolist()
                logits[j, 0, y0:y1 + 1, x0:x1 + 1] = 5.0
            if points is not None:
                for (x, y), lab in zip(points[j].long().tolist(), point_labels[j].tolist()):
                    if lab >= 0:
                        logits[j, 0, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = 5.0 if lab == 1 else -5.0
        if multimask:
            # Three candidates: empty, the real answer, everything; IoU head scores decide.
            cands = torch.stack([torch.full_like(logits[:, 0], -5.0), logits[:, 0], torch.full_like(logits[:, 0], 5.0)], 1)
            return cands, torch.tensor(self.multimask_iou).expand(k, 3)
        self.calls[-1]["output"] = logits
        return logits, torch.ones(k, 1)


def _image():
    return torch.zeros(3, S, S)


def test_box_start_on_a_rectangle_is_perfect_and_needs_no_click():
    gt = np.zeros((1, S, S), bool)
    gt[0, 4:12, 6:20] = True
    seg = BoxAndClicks()
    trace = run_protocol(seg, _image(), gt, (S, S), "box", n_clicks=3)
    assert trace.dice.shape == (1, 4)
    assert np.allclose(trace.dice, 1.0)
    assert (trace.point_labels == -1).all()  # perfect: every later step sends "no point"
    assert seg.calls[0]["boxes"].tolist() == [[6.0, 4.0, 19.0, 11.0]]


@pytest.mark.parametrize("radius", [0.0, 3.0])
def test_corrective_clicks_accumulate_and_feed_back_previous_logits(radius):
    from medico_peft.models.click_prompt import CLICK_VALUE

    gt = np.zeros((1, S, S), bool)
    gt[0, 2:30, 2:30] = True
    gt[0, 2:20, 14:30] = False  # an L shape: the box over-segments the missing quadrant
    seg = BoxAndClicks()
    trace = run_protocol(seg, _image(), gt, (S, S), "box", n_clicks=3, click_radius=radius)
    assert trace.dice[0, -1] > trace.dice[0, 0]
    assert trace.point_labels[0, 0] == 0  # first fix: a negative click in the false-positive quadrant
    yy, xx = np.mgrid[0:S, 0:S]
    for i, call in enumerate(seg.calls[1:], start=1):
        assert call["points"].shape == (1, i, 2)  # all previous clicks are re-sent
        assert call["boxes"] is not None  # the box stays part of the prompt
        fed, prev = call["mask_input"][0, 0].numpy(), seg.calls[i - 1]["output"][0, 0].numpy()
        painted = np.zeros((S, S), bool)
        for (x, y), lab in zip(call["points"][0].tolist(), call["labels"][0].tolist()):
            if lab in (0, 1) and radius > 0:  # every click so far is a disk of ±CLICK_VALUE in the fed-back logits
                disk = (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
                assert (fed[disk] == (CLICK_VALUE if lab == 1 else -CLICK_VALUE)).all()
                painted |= disk
        assert np.array_equal(fed[~painted], prev[~painted])  # elsewhere: the previous logits, unchanged
        assert painted.any() == (radius > 0)
        assert not call["multimask"]
    assert len(seg.calls) == 4


def test_point_start_clicks_the_centre_and_keeps_the_highest_iou_mask():
    gt = np.zeros((1, S, S), bool)
    gt[0, 10:15, 10:15] = True
    seg = BoxAndClicks(multimask_iou=[0.1, 0.9, 0.3])
    trace = run_protocol(seg, _image(), gt, (S, S), "point", n_clicks=0)
    assert seg.calls[0]["multimask"] and seg.calls[0]["boxes"] is None
    assert seg.calls[0]["points"].tolist() == [[[12.0, 12.0]]]
    assert trace.dice[0, 0] == pytest.approx(1.0)  # the 5×5 blob at the centre, not the empty/full candidates


def test_without_mask_input_the_segmenter_never_receives_logits():
    gt = np.zeros((2, S, S), bool)
    gt[0, 3:9, 3:9] = True
    gt[1, 20:30, 5:28] = True
    gt[1, 20:25, 10:20] = False
    seg = BoxAndClicks()
    trace = run_protocol(seg, _image(), gt, (S, S), "box", n_clicks=2, use_mask_input=False)
    assert trace.dice.shape == (2, 3)
    assert all(call["mask_input"] is None for call in seg.calls)


def test_dice_is_measured_on_the_unpadded_content_only():
    gt = np.zeros((1, 20, S), bool)  # content is 20 rows; rows 20.. are padding
    gt[0, 5:10, 5:10] = True
    trace = run_protocol(BoxAndClicks(), _image(), gt, (20, S), "box", n_clicks=0)
    assert trace.start_masks.shape == (1, 20, S)
    assert trace.dice[0, 0] == pytest.approx(1.0)


def test_object_center_is_inside_a_ring_and_box_is_inclusive():
    ring = np.zeros((21, 21), bool)
    ring[2:19, 2:19] = True
    ring[6:15, 6:15] = False
    x, y = object_center(ring)
    assert ring[int(y), int(x)]
    assert tight_box(ring) == (2.0, 2.0, 18.0, 18.0)


def test_unknown_start_and_labels_are_config_errors():
    with pytest.raises(ConfigError, match="start"):
        run_protocol(BoxAndClicks(), _image(), np.ones((1, S, S), bool), (S, S), "scribble", 1)
    names = {1: "Precentral_L", 2: "Precentral_R", 3: "Frontal_Sup_L"}
    assert resolve_labels(["precentral_*", "3"], names, "m.json") == [1, 2, 3]
    assert resolve_labels(None, names, "m.json") is None
    with pytest.raises(ConfigError, match="'Thalamus\\*' matches no label name in m.json"):
        resolve_labels(["Thalamus*"], names, "m.json")
    with pytest.raises(ConfigError, match="id 9 is not in m.json"):
        resolve_labels(["9"], names, "m.json")


def test_as_segmenter_wraps_modules_and_passes_protocol_objects_through():
    seg = BoxAndClicks()
    assert isinstance(seg, Segmenter) and as_segmenter(seg) is seg
    with pytest.raises(TypeError):
        as_segmenter(object())
    from medico_peft.models import load_model

    wrapped = as_segmenter(load_model("vit_tiny"))
    assert isinstance(wrapped, TorchSegmenter) and wrapped.img_size == load_model("vit_tiny").img_size


class DriftingClicks(BoxAndClicks):
    """Answers a click correctly near the click but also switches on a far block outside the object (drift)."""

    def predict(self, emb, points, point_labels, boxes, mask_input, multimask):
        logits, iou = super().predict(emb, points, point_labels, boxes, mask_input, multimask)
        if points is not None and points.shape[1] and not multimask:
            logits = logits.clone()
            logits[:, 0, 26:31, 26:31] = 5.0
        return logits, iou


def test_local_click_merge_keeps_the_drift_away_from_the_click_and_none_takes_it():
    """Truth: a box with a hole. The box start fills the hole (FP); the negative click in the hole is answered
    right by the segmenter, which also switches on a far block. local: only the removal at the click is taken
    (Dice rises); none: the drift comes too (Dice lower than local)."""
    gt = np.zeros((1, S, S), bool)
    gt[0, 2:20, 2:20] = True
    gt[0, 8:14, 8:14] = False
    local = run_protocol(DriftingClicks(), _image(), gt, (S, S), "box", n_clicks=1)
    whole = run_protocol(DriftingClicks(), _image(), gt, (S, S), "box", n_clicks=1, click_merge="none")
    assert local.point_labels[0, 0] == 0
    assert not local.final_masks[0, 26:31, 26:31].any() and whole.final_masks[0, 26:31, 26:31].all()
    assert local.dice[0, 1] > local.dice[0, 0]
    assert whole.dice[0, 1] < local.dice[0, 1]
    with pytest.raises(ConfigError, match="click_merge"):
        run_protocol(DriftingClicks(), _image(), gt, (S, S), "box", n_clicks=1, click_merge="global")


def test_click_response_says_what_a_click_fixed_and_what_it_broke():
    """The drifting segmenter's negative click in the hole removes a 5×5 blob of the 6×6 hole (false positives)
    and switches on a far 5×5 block: the decoder's answer fixes 25 of the 36 region pixels and breaks 25 right
    pixels elsewhere (Dice unchanged); the local merge keeps the fix and none of the breakage (Dice up)."""
    from medico_peft.evaluation.clicks import click_response

    gt = np.zeros((1, S, S), bool)
    gt[0, 2:20, 2:20] = True
    gt[0, 8:14, 8:14] = False
    seen = []
    trace = run_protocol(DriftingClicks(), _image(), gt, (S, S), "box", n_clicks=1, on_click=lambda *a: seen.append(a))
    (round_index, before, raw, kept, xy, label), = seen
    assert round_index == 0 and before.shape == raw.shape == kept.shape == (1, S, S)
    np.testing.assert_array_equal(kept.numpy(), trace.final_masks)
    np.testing.assert_array_equal(before.numpy(), trace.start_masks)
    row, = click_response(before.numpy(), raw.numpy(), kept.numpy(), gt, xy.numpy(), label.numpy())
    assert row["kind"] == "negative" and row["error_px"] == 36 and row["region_px"] == 36
    assert row["fixed_raw"] == row["fixed_kept"] == 25
    assert row["broken_raw"] == 25 and row["broken_kept"] == 0
    assert row["dice_raw"] == pytest.approx(row["dice_before"]) and row["dice_kept"] > row["dice_before"]
    assert row["dice_before"] == pytest.approx(trace.dice[0, 0]) and row["dice_kept"] == pytest.approx(trace.dice[0, 1])
    # no click this round (label -1): no row
    assert click_response(before.numpy(), raw.numpy(), kept.numpy(), gt, xy.numpy(), -np.ones((1, 1))) == [None]


def test_click_response_summary_means_per_label_and_kind():
    from medico_peft.evaluation.report import click_response_markdown, click_response_summary

    def click(name, kind, region, fixed, broken, gain):
        return {"label_name": name, "kind": kind, "error_px": 100, "region_px": region, "fixed_raw": fixed,
                "fixed_kept": fixed, "broken_raw": broken, "broken_kept": 0, "dice_before": 0.5,
                "dice_raw": 0.5 + gain, "dice_kept": 0.5 + gain}

    rows = [click("wm", "negative", 40, 4, 10, 0.0), click("wm", "negative", 20, 10, 30, 0.02),
            click("wm", "positive", 50, 50, 0, 0.1), click("gm", "negative", 10, 0, 0, 0.0)]
    summary = click_response_summary(rows)
    assert [(s["label_name"], s["kind"], s["n"]) for s in summary] == [
        ("gm", "negative", 1), ("wm", "positive", 1), ("wm", "negative", 2)]
    wm_neg = summary[2]
    assert wm_neg["region_share"] == pytest.approx(0.3) and wm_neg["fixed_raw"] == pytest.approx(0.3)
    assert wm_neg["broken_raw"] == pytest.approx(20) and wm_neg["gain_kept"] == pytest.approx(0.01)
    table = "\n".join(click_response_markdown(rows))
    assert "| wm | negative | 2 | 0.300 | 0.300 | 0.300 | 20 / 0 | +0.010 / +0.010 |" in table
    assert click_response_markdown([]) == []


def test_a_slice_is_encoded_once_whatever_its_object_batches():
    """Objects beyond `max_objects_per_batch` run in several protocol batches against one embedding:
    the encoder runs once per slice and the Dice is the same as with every object in one batch."""
    from medico_peft.evaluation.interactive import _run_slice

    class Counting(BoxAndClicks):
        embeds = 0

        def embed(self, image):
            Counting.embeds += 1
            return image

    label_map = torch.zeros(S, S, dtype=torch.long)
    label_map[2:9, 3:7] = 1
    label_map[12:20, 4:30] = 2
    label_map[14:17, 10:20] = 0  # a hole: the box start covers it, so object 2 gets corrective clicks
    label_map[22:30, 10:14] = 3
    item = {"input_size": (S, S), "label_map": label_map, "label_ids": [1, 2, 3], "image": _image()}
    rule = {"use_mask_input": True, "click_radius": 0.0, "click_merge": "none"}
    _, traces, one_batch, clicks_one = _run_slice(Counting(), item, "box", 2, 16, rule)
    assert Counting.embeds == 1 and len(traces) == 1
    _, traces, per_object, clicks_each = _run_slice(Counting(), item, "box", 2, 1, rule)
    assert Counting.embeds == 2 and len(traces) == 3  # three object batches, one more encoder pass in all
    np.testing.assert_array_equal(one_batch, per_object)
    # the click rows name the object within the slice, whatever batch it ran in
    assert clicks_one == clicks_each and {c["object"] for c in clicks_one} == {1}
    assert [(c["object"], c["round"]) for c in clicks_one] == sorted((c["object"], c["round"]) for c in clicks_one)
