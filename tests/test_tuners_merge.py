"""Merge: LoRA/DoRA folded into plain SAM weights with official keys, same outputs; adapters refused when strict."""

from __future__ import annotations

import pytest
import torch

from _peft_helpers import base, logits, perturb_trainable
from medico_peft.errors import AdapterError
from medico_peft.tuners import PeftConfig, inject, is_injected, merge, unload


@pytest.mark.parametrize("family", ["vit_tiny", "litemedsam"])
@pytest.mark.parametrize("cfg", [dict(method="lora", targets=["q", "v"], decoder_lora=True),
                                 dict(method="dora", targets=["qkv", "mlp"], use_rslora=True)],
                         ids=["lora_qv_decoder", "dora_rslora"])
def test_merge_gives_plain_model_with_same_outputs(family, cfg):
    model = base(family)
    official_keys = set(model.state_dict())
    ref = logits(model)
    inject(model, PeftConfig(**cfg))
    perturb_trainable(model)
    tuned = logits(model)
    assert (tuned - ref).abs().max() > 1e-3  # the adapter really changes the model
    merged = merge(model)
    assert set(merged.state_dict()) == official_keys
    assert not is_injected(merged) and is_injected(model)  # original untouched
    assert not hasattr(merged, "peft_config") and hasattr(model, "peft_config")  # peft's own dict goes too
    diff = (logits(merged) - tuned).abs().max().item()
    assert diff <= 1e-4, diff


def test_bottleneck_adapters_are_kept_with_warning_or_refused_when_strict():
    model = inject(base("vit_tiny"), PeftConfig(method="adapter"))
    perturb_trainable(model)
    with pytest.raises(AdapterError, match="bottleneck adapters .* cannot be merged"):
        merge(model, strict=True)
    with pytest.warns(UserWarning, match="cannot be merged"):
        merged = merge(model)
    assert any(".adapter." in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-6, rtol=0)


def test_unload_restores_the_base_encoder():
    model = base("litemedsam")
    keys, ref = set(model.state_dict()), logits(model)
    inject(model, PeftConfig(method="adapter", adapter_kind="sequential", train_decoder=False))
    perturb_trainable(model)
    unload(model)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(logits(model), ref, atol=0, rtol=0)


@pytest.mark.slow
def test_merged_vit_b_checkpoint_loads_into_official_segment_anything(tmp_path):
    """1024² vit_b: the merged .pth loads with every key matching into sam_model_registry['vit_b']."""
    from segment_anything import sam_model_registry

    from medico_peft.models import load_model, save_model

    model = inject(load_model("vit_b"), PeftConfig(rank=4, targets=["q", "v", "proj"]))
    perturb_trainable(model, scale=0.01)
    merged = merge(model, strict=True)
    path = save_model(merged, tmp_path / "merged.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(path))
    ours = merged.state_dict()
    theirs = official.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    # the merged qkv carries the LoRA delta on q and v rows only (contiguous layout)
    base_qkv = model.image_encoder.blocks[0].attn.qkv
    delta = theirs["image_encoder.blocks.0.attn.qkv.weight"] - torch.cat(
        [base_qkv.q.base_layer.weight, base_qkv.k.weight, base_qkv.v.base_layer.weight])
    assert delta[:768].abs().max() > 0 and delta[768:1536].abs().max() == 0 and delta[1536:].abs().max() > 0


def test_verify_merge_returns_the_difference_and_refuses_above_tolerance():
    from medico_peft.errors import ConfigError, ExportError
    from medico_peft.tuners import MergeMismatchError, verify_merge

    model = inject(base("vit_tiny"), PeftConfig(method="lora", targets=["q", "v"]))
    perturb_trainable(model)
    merged = merge(model)
    diff = verify_merge(model, merged, tolerance=1e-4)
    assert 0 <= diff <= 1e-4
    image = torch.rand(2, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(3))
    assert verify_merge(model, merged, tolerance=1e-4, probe=(image, torch.tensor([[1.0, 2.0, 30.0, 40.0]]))) <= 1e-4
    with torch.no_grad():
        merged.mask_decoder.iou_token.weight.add_(0.5)  # a merge that is not exact
    with pytest.raises(MergeMismatchError, match=r"differ by \S+ > tolerance 0\.0001") as info:
        verify_merge(model, merged, tolerance=1e-4)
    assert isinstance(info.value, ExportError) and isinstance(info.value, ConfigError)


def test_peft_state_is_one_attribute_set_by_inject_and_cleared_by_unload():
    from medico_peft.errors import AdapterError
    from medico_peft.tuners import PeftState, peft_state

    model = base("vit_tiny")
    with pytest.raises(AdapterError, match="no PEFT state"):
        peft_state(model)
    cfg = PeftConfig(method="lora", targets=["q", "v"], decoder_lora=True)
    inject(model, cfg, adapter_name="mine")
    state = peft_state(model)
    assert isinstance(state, PeftState) and model.medico_peft is state
    assert state.config == cfg and state.adapter_name == "mine" and state.modules
    assert state.lora_config is model.peft_config["mine"]  # peft's own attribute is left as peft set it
    unload(model)
    assert not is_injected(model) and not hasattr(model, "medico_peft") and not hasattr(model, "peft_config")
