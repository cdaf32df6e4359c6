"""The click losses: `loss.click_bce`, cross-entropy over the pixels around each click, `loss.click_region`,
cross-entropy over the error region each click landed in, and `loss.click_keep`, over the pixels a click round broke,
all against the truth.

Reference: torch's own `binary_cross_entropy_with_logits` over a hand-built disk (per-pixel, no reduction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medico_peft.training.losses import click_bce_loss, click_disks


def test_click_disks_cover_the_pixels_within_the_radius_of_real_clicks_only():
    points = torch.tensor([[[4.0, 5.0], [0.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[1, -1, 2]])  # a click, padding, a box corner
    disks = click_disks(points, labels, (12, 12), radius=2.0)
    ys, xs = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    want = (xs - 4) ** 2 + (ys - 5) ** 2 <= 4
    assert torch.equal(disks[0], want)
    assert int(disks.sum()) == 13


def test_click_bce_is_the_mean_cross_entropy_over_the_disk_and_zero_without_clicks():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, 10)
    target = torch.rand(2, 10, 10) > 0.5
    points = torch.tensor([[[3.0, 3.0]], [[6.0, 6.0]]])
    labels = torch.tensor([[0], [-1]])  # row 1 has no click
    disks = click_disks(points, labels, (10, 10), radius=1.5)
    loss = click_bce_loss(logits, target, disks)
    assert loss.shape == (2, 3)
    ce = F.binary_cross_entropy_with_logits(logits[0], target[0].float().expand(3, 10, 10), reduction="none")
    want = ce[:, disks[0]].mean(dim=1)
    assert torch.allclose(loss[0], want, atol=1e-6)
    assert torch.equal(loss[1], torch.zeros(3))


def test_click_bce_rewards_answering_the_click():
    target = torch.zeros(1, 10, 10, dtype=torch.bool)
    target[0, 2:7, 2:7] = True
    disks = click_disks(torch.tensor([[[4.0, 4.0]]]), torch.tensor([[1]]), (10, 10), radius=2.0)
    ignores = torch.full((1, 1, 10, 10), -3.0)
    answers = ignores.clone()
    answers[0, 0, 2:7, 2:7] = 3.0
    assert click_bce_loss(answers, target, disks) < click_bce_loss(ignores, target, disks)


def test_clicked_regions_are_the_connected_errors_of_the_clicks_kind():
    """Reference: the error regions drawn by hand. Truth has two blobs; the prediction misses both (false
    negatives) and adds a false-positive square. A positive click in blob A selects A only; a negative click
    in the square selects the square; a click on a right pixel, padding (-1) and a box corner (2) select nothing."""
    from medico_peft.evaluation.clicks import clicked_regions

    gt = torch.zeros(3, 20, 20, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True  # blob A
    gt[:, 12:16, 2:6] = True  # blob B
    pred = torch.zeros_like(gt)
    pred[:, 10:14, 12:18] = True  # false positive square
    points = torch.tensor([[[3.0, 3.0], [0.0, 0.0]], [[14.0, 12.0], [3.0, 3.0]], [[19.0, 0.0], [3.0, 13.0]]])
    labels = torch.tensor([[1, -1], [0, 2], [1, 1]])  # row 2: a click on a right pixel, then one in blob B
    regions = clicked_regions(pred.numpy(), gt.numpy(), points.numpy(), labels.numpy())
    a, b, square = torch.zeros(3, 20, 20, dtype=torch.bool).unbind(0)
    a[2:6, 2:6] = True
    b[12:16, 2:6] = True
    square[10:14, 12:18] = True
    assert torch.equal(torch.from_numpy(regions[0]), a)
    assert torch.equal(torch.from_numpy(regions[1]), square)
    assert torch.equal(torch.from_numpy(regions[2]), b)


def test_click_region_loss_adds_the_cross_entropy_over_the_clicked_regions_to_each_click_round(monkeypatch):
    """`loss.click_region`: the same forward (same generator, so the same predictions and clicks) with and
    without the term differs by exactly weight × the mean over click rounds of the region cross-entropy; each
    round's regions are the connected errors its new clicks landed in (recomputed here with scipy from the
    recorded predictions and clicks)."""
    from scipy.ndimage import label as connected

    import medico_peft.training.interactive_step as step_module

    model, batch = _two_objects()
    seen, terms = [], []
    real_regions, real_ce = step_module.clicked_regions, step_module.click_bce_loss

    def regions_spy(pred, gt, points, labels):
        out = real_regions(pred, gt, points, labels)
        seen.append((pred, gt, points, labels, out))
        return out

    def ce_spy(logits, gt, mask):
        out = real_ce(logits, gt, mask)
        terms.append(out.detach())
        return out

    monkeypatch.setattr(step_module, "clicked_regions", regions_spy)
    monkeypatch.setattr(step_module, "click_bce_loss", ce_spy)
    gain = _term_gain(model, batch, "click_region", "center", spied=(seen, terms))
    assert len(seen) == 3 and len(terms) == 3  # regions after rounds 1-3, a loss term in rounds 2-4
    expected = 0.5 * sum(t[:, 0].mean() for t in terms) / 4
    assert float(gain) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert any(out.any() for *_, out in seen)
    for pred, gt, points, labels, out in seen:
        for j in range(len(gt)):
            want = np.zeros_like(gt[j])
            for (x, y), lab in zip(points[j], labels[j]):
                if lab in (0, 1):
                    error = (gt[j] & ~pred[j]) if lab == 1 else (pred[j] & ~gt[j])
                    regions, _ = connected(error, structure=np.ones((3, 3)))
                    if regions[int(round(y)), int(round(x))]:
                        want |= regions == regions[int(round(y)), int(round(x))]
            np.testing.assert_array_equal(out[j], want)


@pytest.mark.parametrize("clicks", ["positive", "negative"])
def test_click_region_clicks_scores_only_the_regions_of_that_click_kind(monkeypatch, clicks):
    """`loss.click_region_clicks`: the same forward (same generator: the same clicks) hands `clicked_regions` the
    same points, with the other kind's labels turned into -1 (skipped there), so only that kind's regions are
    scored; the run with both kinds must have clicked both kinds for the check to mean something."""
    import medico_peft.training.interactive_step as step_module
    from medico_peft.training.config import LossConfig
    from medico_peft.training.interactive_step import InteractiveStep
    from medico_peft.training.memory import SegmentedEncoder

    model, batch = _two_objects()
    real_regions = step_module.clicked_regions
    calls = {}

    def spy(pred, gt, points, labels):
        calls.setdefault(kind, []).append((points.copy(), labels.copy()))
        return real_regions(pred, gt, points, labels)

    monkeypatch.setattr(step_module, "clicked_regions", spy)
    for kind in ("both", clicks):
        step = InteractiveStep(model, SegmentedEncoder(model), LossConfig(click_region=0.5, click_region_clicks=kind),
                               6, 1.0, click_sampling="uniform")
        with torch.no_grad():
            step(batch["image"], batch, "box", torch.Generator().manual_seed(0))
    both = np.concatenate([labels.ravel() for _, labels in calls["both"]])
    assert {0, 1} <= set(both.tolist())  # both kinds were clicked
    keep = 1 if clicks == "positive" else 0
    for (p_both, l_both), (p_kind, l_kind) in zip(calls["both"], calls[clicks], strict=True):
        np.testing.assert_array_equal(p_kind, p_both)
        np.testing.assert_array_equal(l_kind, np.where(l_both == keep, l_both, -1))


def test_click_keep_sums_the_cross_entropy_over_the_broken_pixels_per_clicked_region_pixel():
    """`click_keep_loss`, against torch's per-pixel cross-entropy over a hand-picked set: the pixels right in
    the previous answer and wrong in this output, summed, divided by the clicked regions' size; a row whose
    clicks landed in no error region scores 0."""
    from medico_peft.training.losses import click_keep_loss

    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    prev = target.clone()
    prev[:, 2:4, 2:4] = False  # a 2×2 false-negative region the click landed in
    regions = torch.zeros_like(target)
    regions[0, 2:4, 2:4] = True  # row 1: no region
    logits = torch.full((2, 2, 8, 8), -4.0)
    logits[:, :, 2:6, 2:6] = 4.0  # output 0: every pixel right
    logits[:, 1, 0, 0:3] = 1.5  # output 1: three background pixels broken...
    logits[:, 1, 2, 2] = -1.0  # ...and one clicked pixel wrong (it was wrong before: not broken)
    loss = click_keep_loss(logits, target, prev, regions)
    assert loss.shape == (2, 2)
    ce = F.binary_cross_entropy_with_logits(logits[0, 1], target[0].float(), reduction="none")
    assert float(loss[0, 0]) == 0.0
    assert float(loss[0, 1]) == pytest.approx(float(ce[0, 0:3].sum()) / 4, rel=1e-6)
    assert torch.equal(loss[1], torch.zeros(2))
    broken_more = logits.clone()
    broken_more[:, 1, 7, 7] = 0.5
    assert click_keep_loss(broken_more, target, prev, regions)[0, 1] > loss[0, 1]


def test_click_keep_loss_adds_the_broken_pixel_term_to_each_click_round(monkeypatch):
    """`loss.click_keep`: the same forward (same generator: the same predictions and clicks) with and without the
    term differs by exactly weight × the mean over rounds of the keep term; each round scores its output against
    the answer the clicks corrected and the regions of every new click (recomputed here with `clicked_regions`)."""
    import medico_peft.training.interactive_step as step_module
    from medico_peft.evaluation.clicks import clicked_regions

    model, batch = _two_objects()
    real_keep = step_module.click_keep_loss
    calls, prompts = [], []
    real_add = step_module.add_clicks

    def add_spy(prompt, pred, gt, generator, sampling="uniform", depth=0.0):
        out = real_add(prompt, pred, gt, generator, sampling, depth)
        clicked = 0 if prompt["points"] is None else prompt["points"].shape[1]
        prompts.append((pred.clone(), gt.clone(), out["points"][:, clicked:].clone(),
                        out["point_labels"][:, clicked:].clone()))
        return out

    def keep_spy(logits, gt, prev, regions):
        out = real_keep(logits, gt, prev, regions)
        calls.append((prev.clone(), regions.clone(), out.detach()))
        return out

    monkeypatch.setattr(step_module, "click_keep_loss", keep_spy)
    monkeypatch.setattr(step_module, "add_clicks", add_spy)
    gain = _term_gain(model, batch, "click_keep", "uniform", spied=(calls,), cleared=(prompts,))
    assert len(calls) == 3 and len(prompts) == 3  # a keep term in rounds 2-4
    expected = 0.5 * sum(out[:, 0].mean() for *_, out in calls) / 4
    assert float(expected) > 0  # some round broke pixels: the check compares a real term
    assert float(gain) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    for (prev, regions, _), (pred, gt, points, labels) in zip(calls, prompts, strict=True):
        assert torch.equal(prev, pred)
        want = clicked_regions(pred.numpy(), gt.numpy(), points.numpy(), labels.numpy())
        np.testing.assert_array_equal(regions.numpy(), want)


def test_click_keep_must_not_be_negative():
    from medico_peft.errors import ConfigError
    from medico_peft.training.config import LossConfig, TrainConfig

    with pytest.raises(ConfigError, match="loss.click_keep"):
        TrainConfig.from_dict({"loss": {"click_keep": -1.0}})
    assert LossConfig(click_keep=0.25).click_keep == 0.25


def _two_objects():
    """A random vit_tiny and one image with two objects: the first with a hole inside its box (the box start tends
    to fill it: false positives for a negative click), the second a plain rectangle."""
    from medico_peft.models import build_model

    model = build_model("vit_tiny", seed=0).eval()
    s = model.img_size
    masks = torch.zeros(1, 2, s, s)
    masks[0, 0, 20:80, 16:60] = 1
    masks[0, 0, 40:60, 30:44] = 0
    masks[0, 1, 80:120, 60:120] = 1
    batch = {"image": torch.rand(1, 3, s, s), "masks": masks,
             "boxes": torch.tensor([[[16.0, 20, 59, 79], [60, 80, 119, 119]]]),
             "points": torch.tensor([[[[40.0, 30]], [[90, 100]]]]), "point_labels": torch.tensor([[[1], [1]]]),
             "object_valid": torch.tensor([[True, True]])}
    return model, batch


def _term_gain(model, batch, term: str, sampling: str, spied, cleared=()):
    """The step's loss with `LossConfig(term=0.5)` minus with `term=0`, both from the same generator seed (the same
    predictions and clicks). `spied`: lists the term's spies fill, which the run without it must leave empty;
    they and `cleared` are emptied before each run, so they end with the weighted run's records."""
    from medico_peft.training.config import LossConfig
    from medico_peft.training.interactive_step import InteractiveStep
    from medico_peft.training.memory import SegmentedEncoder

    losses = {}
    for weight in (0.0, 0.5):
        for records in (*spied, *cleared):
            records.clear()
        step = InteractiveStep(model, SegmentedEncoder(model), LossConfig(**{term: weight}), 3, 1.0,
                               click_sampling=sampling)
        with torch.no_grad():
            losses[weight], _ = step(batch["image"], batch, "box", torch.Generator().manual_seed(0))
        if weight == 0.0:
            assert not any(spied)
    return losses[0.5] - losses[0.0]
