"""`inject`: apply a `PeftConfig` to a `MedSam` in place."""

from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from .config import PeftConfig
from .freeze import apply_freeze_policy


def is_injected(model: nn.Module) -> bool:
    return isinstance(getattr(model, "peft_config", None), PeftConfig)


def inject(model: nn.Module, cfg: PeftConfig | dict, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA/DoRA (peft) and/or bottleneck adapters, apply the freeze policy, record `model.peft_config`.

    Every method leaves the model's outputs unchanged at initialisation (LoRA B = 0, adapter up = 0).
    """
    if isinstance(cfg, dict):
        cfg = PeftConfig.from_dict(cfg)
    if is_injected(model):
        raise AdapterError(f"model already has a {model.peft_config.method} adapter injected; "
                           "call medico_peft.tuners.unload(model) first or use AdapterBank for several adapters")
    peft_modules: list[str] = []
    if cfg.method == "adapter":
        from .adapter import inject_adapters

        peft_modules += inject_adapters(model, cfg)
    if cfg.uses_lora:
        from .lora import inject_lora

        peft_modules += inject_lora(model, cfg, adapter_name=adapter_name)
        model.peft_lora_config = model.peft_config[adapter_name]  # peft's LoraConfig, for HF export
    model.peft_config = cfg
    model.peft_adapter_name = adapter_name
    model.peft_modules = peft_modules
    apply_freeze_policy(model, cfg)
    return model
