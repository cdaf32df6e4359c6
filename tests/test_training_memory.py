"""Memory modes and losses: segmented encoder = encoder, frozen prefix keeps no graph, checkpointing and
the feature cache change nothing numerically, bf16 autocast trains on CPU, best-of-3 Dice."""

from __future__ import annotations

import pytest
import torch

from medico_peft.models import build_model
from medico_peft.training.config import LossConfig
from medico_peft.training.interactive_step import InteractiveStep, finish_backward, validate_batch
from medico_peft.training.losses import dice_loss, mask_losses, true_iou
from medico_peft.training.memory import FeatureCache, SegmentedEncoder, autocast, peak_memory_bytes
from medico_peft.tuners import PeftConfig, inject


def _model(name="vit_tiny", **peft):
    model = build_model(name, seed=0)
    inject(model, PeftConfig(**peft))
    return model.train()


def _batch(s=128, b=2, n=3):
    masks = torch.zeros(b, n, s, s)
    masks[:, 0, 20:60, 30:80] = 1
    masks[:, 1, 70:110, 10:50] = 1
    boxes = torch.tensor([[30.0, 20, 79, 59], [10, 70, 49, 109], [0, 0, 0, 0]]).expand(b, n, 4)
    points = torch.tensor([[[50.0, 40]], [[30, 90]], [[0, 0]]]).expand(b, n, 1, 2)
    return {"image": torch.rand(b, 3, s, s), "masks": masks, "boxes": boxes, "points": points,
            "point_labels": torch.tensor([[1], [1], [-1]]).expand(b, n, 1),
            "object_valid": torch.tensor([[True, True, False], [True, False, False]])}


@pytest.mark.parametrize("name,peft", [
    ("vit_tiny", {"method": "lora", "blocks": 2}), ("vit_tiny", {"method": "full"}),
    ("vit_tiny", {"method": "decoder_only"}), ("litemedsam", {"method": "lora", "blocks": 4}),
])
def test_segmented_encoder_equals_encoder_and_finds_prefix(name, peft):
    model = _model(name, **peft)
    enc = SegmentedEncoder(model)
    x = torch.rand(1, 3, model.img_size, model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model.encode(x), rtol=0, atol=0)
    n_blocks = {"vit_tiny": 4, "litemedsam": 10}[name]
    first_trainable = {"lora": n_blocks - peft.get("blocks", n_blocks), "full": None, "decoder_only": "all"}[peft["method"]]
    names = [s[0] for s in enc.segments]
    if first_trainable is None:
        assert enc.n_prefix == 0
    elif first_trainable == "all":
        assert enc.n_prefix == len(names)  # decoder-only: the whole encoder is frozen prefix (embeddings cached)
    else:
        assert all(not any(p.requires_grad for p in s[1].parameters()) for s in enc.segments[: enc.n_prefix])
        assert any(p.requires_grad for p in enc.segments[enc.n_prefix][1].parameters())
    if name == "litemedsam":
        assert names[0] == "stem"  # patch_embed + the full-resolution conv stage: always frozen prefix


def test_frozen_prefix_and_checkpointing_give_identical_gradients():
    """No-grad prefix and activation checkpointing are memory tricks only: same loss, same gradients."""
    batch = _batch()
    results = []
    for frozen_prefix, checkpointing in ((False, False), (True, False), (True, True)):
        model = _model(method="lora", blocks=2)
        step = InteractiveStep(model, SegmentedEncoder(model, frozen_prefix, checkpointing), LossConfig(), 2, 0.5)
        loss, _ = step(batch["image"], batch, "point", torch.Generator().manual_seed(0))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(g, results[0][1][n], atol=1e-6, rtol=1e-4)


def test_frozen_prefix_keeps_no_autograd_graph():
    model = _model(method="lora", blocks=1)
    enc = SegmentedEncoder(model, frozen_prefix=True)
    x = torch.rand(1, 3, 128, 128)
    prefix_out = enc._prefix(model.normalize(x))
    assert enc.n_prefix == 4 and prefix_out.grad_fn is None and not prefix_out.requires_grad


def test_feature_cache_reuses_prefix_output_exactly():
    model = _model(method="lora", blocks=1)
    cache = FeatureCache(torch.float32)
    enc = SegmentedEncoder(model, cache=cache)
    calls = []
    model.image_encoder.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 128, 128)
    first = enc(x)
    second = enc(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert len(calls) == 1 and cache.hits == 2 and cache.misses == 2 and len(cache.store) == 2
    enc(torch.rand(2, 3, 128, 128))  # other images never hit stale entries
    assert cache.misses == 4 and len(cache.store) == 4
    tiny = FeatureCache(torch.float16, max_bytes=1)  # over budget: computed, not stored
    tiny.put(FeatureCache.keys(x), first)
    assert tiny.store == {}


def test_bf16_autocast_step_on_cpu_trains():
    model = _model(method="lora", blocks=2)
    step = InteractiveStep(model, SegmentedEncoder(model), LossConfig(), 1, 0.5)
    batch = _batch()
    with autocast("bf16", torch.device("cpu")):
        loss, stats = step(batch["image"], batch, "box", torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stats["objects"] == 3
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20


def test_padding_objects_are_excluded_and_validation_reports_per_object():
    model = _model(method="lora", blocks=2)
    enc = SegmentedEncoder(model)
    batch = _batch()
    box, final = validate_batch(model, enc, batch, torch.device("cpu"), 2)  # protocol clicks: deterministic
    assert box.shape == (3,) and final.shape == (3,)  # 3 valid objects of 6 rows
    batch["object_valid"][:] = False
    loss, stats = InteractiveStep(model, enc, LossConfig(), 1, 0.5)(batch["image"], batch, "box", torch.Generator())
    assert stats["objects"] == 0 and loss.item() == 0.0


def test_losses_best_of_multimask_and_iou_target():
    gt = torch.zeros(1, 8, 8)
    gt[0, 2:6, 2:6] = 1
    perfect = (gt * 20 - 10).unsqueeze(1)
    wrong = torch.full_like(perfect, -10.0)
    logits = torch.cat([wrong, perfect, wrong], dim=1)  # (1, 3, 8, 8): only mask 1 is right
    d = dice_loss(logits, gt)
    assert d.shape == (1, 3) and d[0, 1] < 1e-3 and d[0, 0] > 0.99
    assert d.min(1).values.item() < 1e-3  # best of the three masks is what the trainer uses
    iou = true_iou(logits, gt)
    assert iou[0].tolist() == [0.0, 1.0, 0.0]
    both = mask_losses(logits, gt, LossConfig(dice=1.0, bce=1.0, focal=1.0))
    assert both.shape == (1, 3) and both[0, 1] < both[0, 0]


# --- per-iteration backward --------------------------------------------------------------------
def _randomise_trainable(model, seed=1):
    """LoRA B starts at zero (A would get no gradient): give every trainable tensor generic values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _both_paths(model, enc, batch, kind, sub_iterations=2, scale=None, precision="fp32", loss_cfg=None,
                click_sampling="uniform"):
    """Gradients of the single backward of the summed loss and of the per-iteration backward."""
    results = []
    for split in (False, True):
        step = InteractiveStep(model, enc, loss_cfg or LossConfig(), sub_iterations, 0.5, per_iteration_backward=split,
                               click_sampling=click_sampling)
        with autocast(precision, torch.device("cpu")):
            loss, stats = step(batch["image"], batch, kind, torch.Generator().manual_seed(0), scale)
        assert ("rest" in stats) == split and (not split or not loss.requires_grad)
        finish_backward(loss, stats, scale)
        results.append((loss.item(), _grads(model)))
    return results


@pytest.mark.parametrize("name,peft,mem,kind", [
    ("vit_tiny", {"method": "lora"}, {}, "point"),
    ("vit_tiny", {"method": "lora", "blocks": 2}, {"checkpointing": True}, "box"),
    ("vit_tiny", {"method": "lora", "blocks": 2}, {"frozen_prefix": False}, "point"),
    ("vit_tiny", {"method": "lora", "blocks": 2}, {"cache": True}, "point"),
    ("vit_tiny", {"method": "full"}, {}, "point"),
    ("vit_tiny", {"method": "decoder_only"}, {"cache": True}, "box"),
    ("litemedsam", {"method": "lora"}, {}, "point"),
    ("litemedsam", {"method": "lora", "blocks": 4}, {"checkpointing": True}, "box"),
])
def test_per_iteration_backward_gives_the_same_gradients(name, peft, mem, kind):
    """Graph cut at the embedding + one backward per sub-iteration == one backward of the summed loss."""
    torch.manual_seed(0)
    model = _model(name, **peft)
    _randomise_trainable(model)
    cache = FeatureCache(torch.float32) if mem.get("cache") else None
    enc = SegmentedEncoder(model, mem.get("frozen_prefix", True), mem.get("checkpointing", False), cache)
    s = model.img_size
    batch = _batch(s)
    if s != 128:  # litemedsam: 256² input
        batch = {**batch, "image": torch.rand(2, 3, s, s),
                 "masks": torch.nn.functional.interpolate(batch["masks"], size=(s, s))}
        batch["boxes"] = batch["boxes"] * 2
        batch["points"] = batch["points"] * 2
    (loss_a, ga), (loss_b, gb) = _both_paths(model, enc, batch, kind, scale=lambda l: l * 3.0)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert ga.keys() == gb.keys() and len(ga) >= 0.9 * sum(p.requires_grad for p in model.parameters())
    if peft["method"] != "decoder_only":
        assert any(k.startswith("image_encoder") for k in ga)  # the encoder really got gradients
    for n in ga:
        scale_ = ga[n].abs().max().item() + 1e-12
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6 * scale_, msg=n)


def test_click_training_adds_the_click_loss_and_keeps_both_backward_paths_equal():
    """train.click_sampling=interior + loss.click_bce: the loss grows by the click term, and the per-iteration
    backward still equals the single backward of the summed loss."""
    torch.manual_seed(0)
    model = _model("vit_tiny", method="lora")
    _randomise_trainable(model)
    enc = SegmentedEncoder(model, True, False, None)
    batch = _batch(model.img_size)
    plain = _both_paths(model, enc, batch, "box", loss_cfg=LossConfig(), click_sampling="interior")
    clicked = _both_paths(model, enc, batch, "box", loss_cfg=LossConfig(click_bce=1.0), click_sampling="interior")
    assert clicked[0][0] > plain[0][0]
    (loss_a, ga), (loss_b, gb) = clicked
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for n in ga:
        scale_ = ga[n].abs().max().item() + 1e-12
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6 * scale_, msg=n)


def test_center_click_training_keeps_both_backward_paths_equal():
    """train.click_sampling=center (one click per sub-iteration, evaluation's placement) through a whole step:
    the per-iteration backward equals the single backward of the summed loss."""
    torch.manual_seed(0)
    model = _model("vit_tiny", method="lora")
    _randomise_trainable(model)
    enc = SegmentedEncoder(model, True, False, None)
    (loss_a, ga), (loss_b, gb) = _both_paths(model, enc, _batch(model.img_size), "box", sub_iterations=3,
                                             click_sampling="center")
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for n in ga:
        scale_ = ga[n].abs().max().item() + 1e-12
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6 * scale_, msg=n)


def test_per_iteration_backward_under_bf16_autocast_matches_closely():
    torch.manual_seed(0)
    model = _model(method="lora", blocks=2)
    _randomise_trainable(model)
    (loss_a, ga), (loss_b, gb) = _both_paths(model, SegmentedEncoder(model), _batch(), "box", precision="bf16")
    assert loss_b == pytest.approx(loss_a, rel=1e-2)
    for n in ga:
        assert torch.isfinite(gb[n]).all()
        cos = torch.nn.functional.cosine_similarity(ga[n].flatten(), gb[n].flatten(), dim=0)
        assert cos > 0.99 or ga[n].abs().max() < 1e-8, n


def test_per_iteration_backward_keeps_one_sub_iteration_of_decoder_graph():
    """Bytes held by autograd's saved tensors at their peak: the summed loss keeps every sub-iteration's
    decoder graph; the per-iteration backward keeps one (the encoder graph is the same in both)."""
    class Counter:
        now = peak = 0

    class Held:  # what autograd keeps instead of the saved tensor; freed with its graph
        def __init__(self, t):
            self.t, self.size = t, t.numel() * t.element_size()
            Counter.now += self.size
            Counter.peak = max(Counter.peak, Counter.now)

        def __del__(self):
            Counter.now -= self.size

    model = _model(method="decoder_only")
    cache = FeatureCache(torch.float32)
    enc = SegmentedEncoder(model, cache=cache)
    batch = _batch()
    enc(batch["image"])  # fill the cache: the encoder keeps no graph at all here
    peaks = {}
    for split in (False, True):
        step = InteractiveStep(model, enc, LossConfig(), 5, 0.0, per_iteration_backward=split)
        Counter.now = Counter.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            loss, stats = step(batch["image"], batch, "box", torch.Generator().manual_seed(0))
            finish_backward(loss, stats)
        del loss, stats
        peaks[split] = Counter.peak
    assert peaks[True] * 4 < peaks[False]  # 6 sub-iterations alive vs 1
