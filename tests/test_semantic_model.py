"""SemanticSam: both heads on ViT and TinyViT, PEFT injection, encoder taps, SAMed growth from SAM's decoder."""

from __future__ import annotations

import pytest
import torch

from medico_peft.errors import ConfigError
from medico_peft.models import build_model
from medico_peft.models.semantic import SemanticSam, build_semantic, default_channels
from medico_peft.training.memory import FeatureCache, SegmentedEncoder
from medico_peft.tuners.semantic import inject_semantic

NAMES4 = ["background", "a", "b", "c"]
SMALL_TINYVIT = [16, 16, 8]  # keeps the 256² TinyViT test fast; the default widths are tested on ViT


def _model(name: str, kind: str, classes: int = 4):
    sam = build_model(name, seed=0)
    channels = SMALL_TINYVIT if (name == "litemedsam" and kind == "unetr") else None
    return build_semantic(sam, kind, classes, ["background"] + [f"c{i}" for i in range(1, classes)], channels=channels)


@pytest.mark.parametrize("name", ["vit_tiny", "litemedsam"])
@pytest.mark.parametrize("kind", ["unetr", "samed"])
def test_heads_give_class_logits_at_input_resolution(name, kind):
    model = _model(name, kind, classes=5).eval()
    s = model.img_size
    x = torch.rand(1, 3, s, s)
    with torch.no_grad():
        out = model(x)
    assert isinstance(model, SemanticSam) and out.shape == (1, 5, s, s) and torch.isfinite(out).all()
    assert model.describe()["class_names"][0] == "background" and model.describe()["num_classes"] == 5


def test_default_unetr_widths_and_channel_errors():
    vit = build_model("vit_tiny", seed=0)
    assert default_channels(vit) == [256, 128, 64, 32, 16]  # 128² input, 8² embedding: 5 levels
    assert default_channels(build_model("litemedsam", seed=0)) == [64, 32, 16]
    with pytest.raises(ConfigError, match="semantic.channels: vit_tiny at 128² needs 5 decoder widths"):
        build_semantic(vit, "unetr", 3, ["background", "a", "b"], channels=[32, 16])
    with pytest.raises(ConfigError, match="unknown head 'fcn'"):
        build_semantic(vit, "fcn", 3, ["background", "a", "b"])
    with pytest.raises(ConfigError, match="3 class names for 4 classes"):
        build_semantic(vit, "unetr", 4, ["background", "a", "b"])


@pytest.mark.parametrize("method,kind", [("lora", "unetr"), ("dora", "unetr"), ("adapter", "unetr"),
                                         ("decoder_only", "unetr"), ("full", "unetr"), ("lora", "samed")])
def test_peft_injection_trains_head_and_method_params_only_and_gradients_flow(method, kind):
    model = _model("vit_tiny", kind)
    inject_semantic(model, {"method": method, "rank": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.head.named_parameters(prefix="head")}
    assert head <= trainable
    assert not any(n.startswith(("sam.mask_decoder.", "sam.prompt_encoder.")) for n in trainable)
    enc = {n for n in trainable if n.startswith("sam.image_encoder.")}
    if method == "full":
        assert enc == {n for n, _ in model.sam.image_encoder.named_parameters(prefix="sam.image_encoder")}
    elif method == "decoder_only":
        assert enc == set()
    else:
        marker = "adapter" if method == "adapter" else "lora_"
        assert enc and all(marker in n for n in enc)  # every base encoder weight stays frozen
    model.train()
    x = torch.rand(2, 3, 128, 128)
    target = torch.randint(0, 4, (2, 128, 128))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    for n, p in model.named_parameters():
        # B and the adapter's up projection start at 0, so they are the ones with a gradient at step 0
        if n in trainable and ("lora_B" in n or n.startswith("head.") or ".up." in n or method == "full"):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"
        if n not in trainable:
            assert p.grad is None


def test_lora_b_gets_gradient_and_output_starts_equal_to_plain_head():
    """LoRA starts as the identity (B = 0), so injecting leaves the semantic logits unchanged."""
    model = _model("vit_tiny", "unetr").eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)
    inject_semantic(model, {"method": "lora", "rank": 2})
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vit_tiny", "litemedsam"])
def test_segmented_encoder_taps_equal_forward_hooks_with_and_without_cache(name):
    """The trainer reads skips from SegmentedEncoder (frozen prefix, cache); inference reads them with hooks."""
    model = _model(name, "unetr")
    inject_semantic(model, {"method": "lora", "rank": 2, "blocks": 1})
    model.eval()
    s = model.img_size
    x = torch.rand(1, 3, s, s)
    with torch.no_grad():
        want = model(x)
        for cache in (None, FeatureCache(torch.float32)):
            enc = SegmentedEncoder(model.sam, frozen_prefix=True, cache=cache)
            assert enc.n_prefix > 0
            for _ in range(2):  # second pass: cache hit (prefix taps come from the cache)
                emb, taps = enc(x, model.taps)
                got = model.decode(emb, taps, x)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if cache is not None:
                assert cache.hits == 1 and cache.misses == 1


def test_samed_head_starts_as_sams_decoder_without_prompts():
    """With 4 classes the head starts as SAM's decoder exactly: no prompt (empty sparse, no-mask dense), its
    logits equal the MedSam interactive decoder's 4 mask outputs, whose own decoder is left unchanged. More
    classes grow from the pretrained tokens and hypernetworks cyclically."""
    sam = build_model("vit_tiny", seed=0).eval()
    x = torch.rand(2, 3, 128, 128)
    box = torch.tensor([[10.0, 10.0, 60.0, 70.0]])
    with torch.no_grad():
        interactive_before = sam(x[:1], boxes=box)[0]
        emb = sam.encode(x)
        sparse, dense = sam.embed_prompts()
        ref, _ = sam.decode_all_tokens(emb, sparse.expand(2, -1, -1), dense.expand(2, -1, -1, -1),
                                       image_index=torch.arange(2))
        model = build_semantic(sam, "samed", 4, NAMES4).eval()
        low = model.head(emb, sam.prompt_encoder.get_dense_pe())
        interactive_after = sam(x[:1], boxes=box)[0]
    assert low.shape == (2, 4, 32, 32)
    torch.testing.assert_close(low, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(interactive_after, interactive_before, atol=0, rtol=0)
    assert model.head.transformer is not sam.mask_decoder.transformer  # the head trains its own copy
    assert model(x).shape == (2, 4, 128, 128)
    grown = build_semantic(sam, "samed", 6, ["background"] + [f"c{i}" for i in range(1, 6)])
    md = sam.mask_decoder
    for cls, src in ((4, 0), (5, 1)):
        assert torch.equal(grown.head.class_tokens[cls], md.mask_tokens.weight[src])
        for a, b in zip(grown.head.hypernetworks[cls].parameters(), md.output_hypernetworks_mlps[src].parameters()):
            assert torch.equal(a, b)
