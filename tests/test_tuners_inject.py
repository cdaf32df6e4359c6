"""Injection: identity at init for every method on both encoder families, counts, block selection,
freeze policy, the interleaved (TinyViT) qkv split, and bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _peft_helpers import METHOD_CASES, base, logits
from medico_peft.errors import AdapterError, ConfigError
from medico_peft.tuners import PeftConfig, encoder_blocks, inject, parameter_report, trainable_state_dict
from medico_peft.tuners.qkv_split import SplitQkv, _row_indices, split_qkv


@pytest.mark.parametrize("family", ["vit_tiny", "litemedsam"])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_every_method_starts_at_the_base_model(family, case):
    model = base(family)
    ref = logits(model)
    inject(model, PeftConfig(**METHOD_CASES[case]))
    trained = trainable_state_dict(model)
    assert trained and all(p.requires_grad for p in trained.values())
    assert not any(n.startswith("image_encoder.") and "lora_" not in n and ".adapter." not in n for n in trained)
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)


def test_block_counts_and_selection():
    assert len(encoder_blocks(base("vit_tiny"))) == 4
    lite = base("litemedsam")
    assert len(encoder_blocks(lite)) == 10
    inject(lite, PeftConfig(targets=["v"], blocks=2, train_decoder=False))
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable_state_dict(lite)}
    assert adapted == {"image_encoder.layers.3.blocks.0.attn.qkv.v", "image_encoder.layers.3.blocks.1.attn.qkv.v"}
    tiny = inject(base("vit_tiny"), PeftConfig(targets=["proj", "mlp"], blocks=[0, 2], train_decoder=False))
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable_state_dict(tiny)}
    assert adapted == {f"image_encoder.blocks.{b}.{m}" for b in (0, 2) for m in ("attn.proj", "mlp.lin1", "mlp.lin2")}
    # peft never touches the patch-embedding Conv2d called `proj`
    assert type(tiny.image_encoder.patch_embed.proj) is nn.Conv2d


def test_bad_block_and_double_injection_are_refused():
    with pytest.raises(ConfigError, match=r"blocks: index 99 matches no attention block; vit_tiny has 4 blocks"):
        inject(base("vit_tiny"), PeftConfig(blocks=[99]))
    with pytest.raises(ConfigError, match="last 12 blocks but litemedsam has only 10"):
        inject(base("litemedsam"), PeftConfig(blocks=12))
    model = inject(base("vit_tiny"), PeftConfig())
    with pytest.raises(AdapterError, match="already has a lora adapter"):
        inject(model, PeftConfig())


def test_freeze_policy():
    def trainable_parts(model):
        return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}

    lora = inject(base("vit_tiny"), PeftConfig())
    assert trainable_parts(lora) == {"image_encoder", "mask_decoder"}
    assert not any(p.requires_grad for p in lora.prompt_encoder.parameters())
    assert all(p.requires_grad for p in lora.mask_decoder.parameters())
    dec_lora = inject(base("vit_tiny"), PeftConfig(decoder_lora=True, train_prompt_encoder=True))
    dec = {n for n, p in dec_lora.named_parameters() if p.requires_grad and n.startswith("mask_decoder.")}
    assert dec and all("lora_" in n for n in dec)
    assert all(p.requires_grad for p in dec_lora.prompt_encoder.parameters())
    only = inject(base("vit_tiny"), PeftConfig(method="decoder_only"))
    assert trainable_parts(only) == {"mask_decoder"}
    full = inject(base("vit_tiny"), PeftConfig(method="full"))
    rows = parameter_report(full)
    assert rows[-1].submodule == "total" and rows[-1].trainable == rows[-1].total


def test_tinyvit_batchnorm_stays_in_eval_mode_after_wrapping():
    model = inject(base("litemedsam"), PeftConfig(method="adapter", adapter_kind="sequential"))
    model.train()
    bns = [m for m in model.image_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 27 and not any(bn.training for bn in bns)
    assert model.mask_decoder.training


@pytest.mark.parametrize("family", ["vit_tiny", "litemedsam"])
def test_split_qkv_reproduces_the_fused_layer_and_fuses_back(family):
    attn = encoder_blocks(base(family))[-1].attn
    fused = attn.qkv
    weight = fused.weight.detach().clone()
    x = torch.randn(2, 5, fused.in_features)
    ref = fused(x)
    split = split_qkv(attn)
    assert isinstance(attn.qkv, SplitQkv) and split.layout["kind"] == ("interleaved" if family == "litemedsam"
                                                                       else "contiguous")
    torch.testing.assert_close(split(x), ref, atol=1e-6, rtol=0)
    assert torch.equal(split.fuse().weight, weight)


def test_interleaved_v_lora_changes_only_v_features():
    """TinyViT interleaves q|k|v per head: LoRA on v must move exactly the v columns of the fused output."""
    model = inject(base("litemedsam"), PeftConfig(targets=["v"], blocks=[9], train_decoder=False))
    attn = encoder_blocks(model)[9].attn
    captured = []
    attn.qkv.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))
    logits(model)
    with torch.no_grad():
        attn.qkv.v.lora_B["default"].weight.normal_(std=0.1)
    logits(model)
    before, after = captured
    rq, rk, rv = _row_indices(attn.qkv.layout)
    assert len(rv) == 320 and sorted(torch.cat([rq, rk, rv]).tolist()) == list(range(960))
    assert torch.equal(before[..., rq], after[..., rq]) and torch.equal(before[..., rk], after[..., rk])
    assert (before[..., rv] - after[..., rv]).abs().amax() > 1e-3


@pytest.mark.slow
def test_vit_b_reference_counts_and_identity():
    """SAMed: LoRA r=4 on q,v of all 12 blocks = 147,456; AdaptFormer width 64 = 1,189,632."""
    from medico_peft.models import load_model

    model = load_model("vit_b", img_size=256)
    ref = logits(model)
    inject(model, PeftConfig(rank=4, alpha=4.0, train_decoder=False))
    assert sum(p.numel() for p in trainable_state_dict(model).values()) == 147_456
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)
    from medico_peft.tuners import unload

    unload(model)
    inject(model, PeftConfig(method="adapter", train_decoder=False))
    assert sum(p.numel() for p in trainable_state_dict(model).values()) == 1_189_632
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)
