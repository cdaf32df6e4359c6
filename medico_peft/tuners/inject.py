"""`inject`: apply a `PeftConfig` to a `MedSam` in place."""

from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from .config import PeftConfig
from .freeze import apply_freeze_policy
from .state import PeftState, is_injected, peft_state, set_state


def inject(model: nn.Module, cfg: PeftConfig | dict, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA/DoRA (peft) and/or bottleneck adapters, apply the freeze policy, record `model.medico_peft`
    (a `PeftState`, read through `is_injected` / `peft_state`).

    The base weights are hashed here (`model.base_sha256`), so an adapter file names the weights it was
    trained on even if they were changed in place after loading. Every method leaves the model's outputs unchanged at initialisation (LoRA B = 0, adapter up = 0;
    PiSSA/OLoRA move the top of each adapted weight into A, B and keep the residual in the base, so the outputs
    equal the base up to float rounding; EVA's data-driven A is set later by `lora.init.eva_initialise`).
    """
    if isinstance(cfg, dict):
        cfg = PeftConfig.from_dict(cfg)
    if is_injected(model):
        raise AdapterError(f"model already has a {peft_state(model).config.method} adapter injected; "
                           "call medico_peft.tuners.unload(model) first or use AdapterBank for several adapters")
    if hasattr(model, "base_sha256"):  # a MedSam: the base an adapter file will name is the one injected into
        from ..utils.hashing import sha256_state_dict

        model.base_sha256 = sha256_state_dict(model.state_dict())
    state = PeftState(cfg, adapter_name=adapter_name)
    if cfg.method == "adapter":
        from .adapter import inject_adapters

        state.modules += inject_adapters(model, cfg)
    if cfg.uses_lora:
        from .lora import inject_lora

        modules, state.lora_init = inject_lora(model, cfg, adapter_name=adapter_name)
        state.modules += modules
        state.lora_config = model.peft_config[adapter_name]  # peft's own attribute: its LoraConfig per adapter
    set_state(model, state)
    apply_freeze_policy(model, cfg)
    return model
