"""Finding, merging and removing peft's LoRA layers inside a model (without a PeftModel wrapper)."""

from __future__ import annotations

from torch import nn


def _tuner_layer_cls():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of peft tuner layers (outermost only), e.g. `...attn.qkv.q`."""
    cls = _tuner_layer_cls()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, cls) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def replace_lora_layers(model: nn.Module, merge: bool) -> int:
    """Replace every peft layer by its base layer, folding the LoRA update in first if `merge`.

    DoRA's magnitude/direction update is folded by peft's own `merge()` as well.
    """
    names = lora_layer_names(model)
    for name in names:
        layer = model.get_submodule(name)
        if merge:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(names)
