"""The click loss (`loss.click_bce`): cross-entropy over the pixels around each click, against the truth.

Reference: torch's own `binary_cross_entropy_with_logits` over a hand-built disk (per-pixel, no reduction)."""

from __future__ import annotations

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
