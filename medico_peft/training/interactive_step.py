"""One training step of interactive segmentation (the MedicoSAM / micro-sam recipe).

Per batch the images are encoded once. Every valid object starts from a single point (multimask
output; the loss takes the best of the three masks, since one point is ambiguous) or from its box
(one mask), alternating per iteration. Then `sub_iterations` times: a random positive click in the
false negatives and a negative click in the false positives of the current best mask are appended
to the prompt (`click_sampling="center"`: instead the one click evaluation places, at the centre of
the deeper error region; `loss.click_region` adds a cross-entropy over the error regions the new clicks
(of the kinds `loss.click_region_clicks` names) landed in to the next round's loss, `loss.click_keep` one over
the pixels the next round turns wrong that the clicked answer had right), and with probability
`mask_feed_prob` the previous low-res logits are fed back as mask input with every click so far painted into
them (`click_radius`, models/click_prompt.py: the same painting evaluation and the Predictor do, so clicks reach
the part of the decoder that reacts). The loss (mask losses + MSE of the IoU head against the true IoU) is
averaged over all sub-iterations.

Per-iteration backward (`per_iteration_backward=True`; the trainer's default via
`memory.per_iteration_backward`): summing all sub-iterations' losses and back-propagating once
keeps every sub-iteration's decoder graph (upscaled logits, transformer and upscaling activations,
× objects × masks) alive at the same time, and that dominates PEFT memory. Instead the graph is
cut at the image embedding: the decoder runs on a leaf copy `emb_leaf`, each sub-iteration's loss
(scaled as in the sum) is back-propagated at once (freeing its decoder graph and accumulating into
the decoder/prompt parameters and `emb_leaf.grad`), and the encoder gets one backward of
`emb · emb_leaf.grad`. By linearity the gradients equal the single backward of the summed loss (up
to float summation order). `forward` then returns the remaining encoder backward in
`stats["rest"]`; `finish_backward` runs whichever backward is left.

Gradient choice: all sub-iterations share the image embedding, so gradients of every
sub-iteration reach the encoder through it. The fed-back logits and the clicks are detached (as in
micro-sam): a click is a discrete choice anyway, and the graph then grows linearly, not
quadratically, with the number of sub-iterations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..evaluation.clicks import center_corrections, clicked_regions, interior_corrections, random_corrections
from ..models.click_prompt import CLICK_MERGE, CLICK_RADIUS, accept_click, paint_clicks
from ..evaluation.metrics import dice_per_object
from .losses import click_bce_loss, click_disks, click_keep_loss, mask_losses, true_iou
from .memory import SegmentedEncoder


def valid_objects(batch: dict, device: torch.device) -> dict:
    """Flatten (B, N, ...) objects to (K, ...) rows, dropping padding objects; adds `image_index`."""
    valid = batch["object_valid"].bool()
    image_index = valid.nonzero()[:, 0]
    out = {"image_index": image_index.to(device)}
    for key in ("masks", "boxes", "points", "point_labels"):
        out[key] = batch[key][valid].to(device)
    return out


def region_click_labels(labels: torch.Tensor, clicks: str) -> torch.Tensor:
    """The new clicks' labels as `loss.click_region` sees them: `clicks` (loss.click_region_clicks) "positive" or
    "negative" turns the other kind into -1, which `clicked_regions` skips; "both" keeps them."""
    if clicks == "both":
        return labels
    keep = 1 if clicks == "positive" else 0
    return torch.where(labels == keep, labels, torch.full_like(labels, -1))


def first_prompt(objs: dict, kind: str) -> dict:
    """A single (positive) point with multimask output, or the box with one mask."""
    if kind == "point":
        return {"points": objs["points"][:, :1].float(), "point_labels": objs["point_labels"][:, :1].long(),
                "boxes": None, "multimask": True}
    return {"points": None, "point_labels": None, "boxes": objs["boxes"].float(), "multimask": False}


def add_clicks(prompt: dict, pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator | None,
               sampling: str = "uniform", depth: float = 0.0) -> dict:
    """Append corrective clicks per object: with a generator (training) one random positive and one random
    negative click (on CPU: the generator lives there), uniform over each error region or, with
    `sampling="interior"`, only from pixels at least `depth` (pred pixels) inside it; without a generator
    (validation) or with `sampling="center"` the evaluation protocol's one click at the centre of the deeper
    error (`center_corrections`)."""
    if generator is None or sampling == "center":
        pts, lbl = center_corrections(pred.cpu(), gt.cpu())
    elif sampling == "interior":
        pts, lbl = interior_corrections(pred.cpu(), gt.cpu(), depth, generator)
    else:
        pts, lbl = random_corrections(pred.cpu(), gt.cpu(), generator)
    device = gt.device
    pts, lbl = pts.to(device), lbl.to(device)
    if prompt["points"] is not None:
        pts = torch.cat([prompt["points"], pts], dim=1)
        lbl = torch.cat([prompt["point_labels"], lbl], dim=1)
    return {**prompt, "points": pts, "point_labels": lbl, "multimask": False}


class InteractiveStep(nn.Module):
    """Module whose forward is the whole interactive loss, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, encoder: SegmentedEncoder, loss_cfg, sub_iterations: int,
                 mask_feed_prob: float, per_iteration_backward: bool = False, touch_all_params: bool = False,
                 click_radius: float = CLICK_RADIUS, click_sampling: str = "uniform"):
        super().__init__()
        self.model = model
        self.encoder = encoder
        self.loss_cfg = loss_cfg
        self.sub_iterations = sub_iterations
        self.mask_feed_prob = mask_feed_prob
        self.click_radius = click_radius
        self.click_sampling = click_sampling
        self.per_iteration_backward = per_iteration_backward
        # DDP: the remaining backward also reaches every trainable parameter (with a zero gradient), so
        # the one synchronised backward all-reduces the decoder grads accumulated inside `forward` too.
        self.touch_all_params = touch_all_params

    def forward(self, images: torch.Tensor, batch: dict, prompt_kind: str, generator: torch.Generator,
                scale=None):
        """(mean loss over sub-iterations, stats). `scale`: maps a loss to what is back-propagated
        (e.g. `lambda l: scaler.scale(l / grad_accum)`); used by the per-iteration backward only."""
        model = self.model
        emb = self.encoder(images, input_size=_input_size(batch, images.device))
        split = self.per_iteration_backward and torch.is_grad_enabled()
        objs = valid_objects(batch, images.device)
        if objs["image_index"].numel() == 0:  # nothing to learn from; keep every rank's graph alive
            zero = emb.float().sum() * 0.0
            if split:
                return zero.detach(), {"dice": float("nan"), "objects": 0, "rest": self._rest(zero)}
            return zero, {"dice": float("nan"), "objects": 0}
        if split:  # cut the graph: decoder graphs end at this leaf and are freed one by one
            dec_emb = emb.detach().requires_grad_(emb.requires_grad)
        else:
            dec_emb = emb
        gt = objs["masks"] > 0.5
        prompt = first_prompt(objs, prompt_kind)
        mask_input = None
        regions = None  # the error regions the last round's clicks landed in (loss.click_region)
        kept = None  # (answer the last round's clicks corrected, all their error regions) for loss.click_keep
        total = 0.0
        n_iter = self.sub_iterations + 1
        for it in range(n_iter):
            sparse, dense = model.embed_prompts(prompt["points"], prompt["point_labels"], prompt["boxes"], mask_input)
            low, iou_pred = model.decode(dec_emb, sparse, dense, image_index=objs["image_index"],
                                         multimask=prompt["multimask"])
            logits = model.upscale_logits(low).float()
            per_mask = mask_losses(logits, gt, self.loss_cfg)  # (K, M)
            if self.loss_cfg.click_bce and it > 0:
                radius = self.click_radius * logits.shape[-1] / low.shape[-1]  # the painted disk, in logit pixels
                disks = click_disks(prompt["points"] * (logits.shape[-1] / model.img_size), prompt["point_labels"],
                                    logits.shape[-2:], radius)
                per_mask = per_mask + self.loss_cfg.click_bce * click_bce_loss(logits, gt, disks)
            if regions is not None:
                per_mask = per_mask + self.loss_cfg.click_region * click_bce_loss(logits, gt, regions)
            if kept is not None:
                per_mask = per_mask + self.loss_cfg.click_keep * click_keep_loss(logits, gt, *kept)
            best = per_mask.argmin(dim=1)
            rows = torch.arange(best.numel(), device=best.device)
            loss = per_mask[rows, best].mean()
            if self.loss_cfg.iou_mse:
                loss = loss + self.loss_cfg.iou_mse * ((iou_pred.float() - true_iou(logits, gt)) ** 2).mean()
            pred = (logits[rows, best] > 0).detach()
            feed_low = low[rows, best].unsqueeze(1).detach()
            if split:
                part = loss / n_iter
                with torch.autocast(images.device.type, enabled=False):  # backward outside autocast
                    (scale(part) if scale is not None else part).backward()
                total = total + part.detach()
                del logits, per_mask, low, iou_pred, loss, part  # nothing of this sub-iteration stays alive
            else:
                total = total + loss
            if it == n_iter - 1:
                break
            depth = self.click_radius * pred.shape[-1] / feed_low.shape[-1]  # the painted disk, in pred pixels
            clicked = 0 if prompt["points"] is None else prompt["points"].shape[1]
            prompt = add_clicks(prompt, pred, gt, generator, self.click_sampling, depth)
            if self.loss_cfg.click_region or self.loss_cfg.click_keep:
                regions, kept = self._clicked(pred, gt, prompt, clicked)
            feed = torch.rand((), generator=generator).item() < self.mask_feed_prob
            mask_input = fed_back_mask(model, feed_low, prompt, self.click_radius) if feed else None
        dice = dice_per_object(pred, gt).mean().item()
        if not split:
            return total / n_iter, {"dice": dice, "objects": int(gt.shape[0])}
        rest = emb.new_zeros(())
        if dec_emb.grad is not None:  # its backward hands emb exactly the accumulated (scaled) gradient
            rest = (emb * dec_emb.grad).sum()
        return total, {"dice": dice, "objects": int(gt.shape[0]), "rest": self._rest(rest)}

    def _clicked(self, pred: torch.Tensor, gt: torch.Tensor, prompt: dict, clicked: int):
        """The error regions the new clicks (from index `clicked` on) landed in: (those of the kinds
        loss.click_region scores, or None; (pred, those of every new click) for loss.click_keep, or None)."""
        points = prompt["points"][:, clicked:].cpu().numpy()
        labels = prompt["point_labels"][:, clicked:]
        pred_np, gt_np = pred.cpu().numpy(), gt.cpu().numpy()

        def regions_of(lbl: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(clicked_regions(pred_np, gt_np, points, lbl.cpu().numpy())).to(gt.device)

        scored = self.loss_cfg.click_region_clicks
        every = regions_of(labels) if self.loss_cfg.click_keep or scored == "both" else None
        regions = None
        if self.loss_cfg.click_region:
            regions = every if scored == "both" else regions_of(region_click_labels(labels, scored))
        return regions, ((pred, every) if self.loss_cfg.click_keep else None)

    def _rest(self, rest: torch.Tensor) -> torch.Tensor:
        if self.touch_all_params:
            params = [p for p in self.model.parameters() if p.requires_grad]
            rest = rest + sum((p.reshape(-1)[:1] * 0.0).sum() for p in params)
        return rest


def finish_backward(loss: torch.Tensor, stats: dict, scale=None) -> None:
    """Run the backward still due after `InteractiveStep.forward`: the encoder's (per-iteration mode,
    already scaled) or the whole single backward of the summed loss (through `scale`)."""
    rest = stats.pop("rest", None)
    if rest is None:
        (scale(loss) if scale is not None else loss).backward()
    elif rest.requires_grad:
        rest.backward()


def prompt_kind_for(step: int, mode: str) -> str:
    """`alternate` switches between a point and a box every iteration (micro-sam)."""
    if mode == "alternate":
        return "point" if step % 2 == 0 else "box"
    return mode


def fed_back_mask(model: nn.Module, low: torch.Tensor, prompt: dict, click_radius: float) -> torch.Tensor:
    """The previous low-res logits with every click so far painted in (`models.click_prompt`)."""
    return paint_clicks(low, prompt["points"], prompt["point_labels"], scale=low.shape[-1] / model.img_size,
                        radius=click_radius)


def _input_size(batch: dict, device: torch.device) -> torch.Tensor | None:
    """Each item's content size (padding beyond it is set to 0 after normalising, as at inference)."""
    size = batch.get("input_size")
    return None if size is None else size.to(device)


@torch.no_grad()
def validate_batch(model: nn.Module, encoder: SegmentedEncoder, batch: dict, device: torch.device, clicks: int,
                   click_radius: float = CLICK_RADIUS, click_merge: str = CLICK_MERGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice per object after the box prompt and after `clicks` corrective clicks placed as the evaluation
    protocol places them (centre of the deeper error), logits fed back with the clicks painted in, each
    click's answer accepted as evaluation accepts it (`click_merge`, models/click_prompt.merge_click)."""
    images = batch["image"].to(device)
    emb = encoder(images, input_size=_input_size(batch, device))
    objs = valid_objects(batch, device)
    if objs["image_index"].numel() == 0:
        empty = torch.zeros(0)
        return empty, empty
    gt = objs["masks"] > 0.5
    prompt = first_prompt(objs, "box")
    mask_input = None
    for it in range(clicks + 1):
        sparse, dense = model.embed_prompts(prompt["points"], prompt["point_labels"], prompt["boxes"], mask_input)
        new_low, _ = model.decode(emb, sparse, dense, image_index=objs["image_index"], multimask=False)
        low = new_low if it == 0 else accept_click(click_merge, low, new_low, new_points, new_labels,
                                                   scale=low.shape[-1] / model.img_size, radius=click_radius,
                                                   boxes=prompt["boxes"])
        pred = model.upscale_logits(low)[:, 0] > 0
        if it == 0:
            box_dice = dice_per_object(pred, gt).cpu()
        if it < clicks:
            prompt = add_clicks(prompt, pred, gt, None)
            new_points, new_labels = prompt["points"][:, -1:], prompt["point_labels"][:, -1:]
            mask_input = fed_back_mask(model, low, prompt, click_radius)
    return box_dice, dice_per_object(pred, gt).cpu()
