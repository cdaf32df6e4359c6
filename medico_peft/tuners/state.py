"""`PeftState`: everything `inject` records on a model, as one typed attribute `model.medico_peft`.

`inject` sets it, `merge` and `unload` clear it, and every reader goes through `is_injected(model)`
and `peft_state(model)`. It never shares a name with peft's own `model.peft_config` (the dict of
peft `LoraConfig`s that `peft.inject_adapter_in_model` puts on the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import AdapterError
from .config import PeftConfig

STATE_ATTR = "medico_peft"


@dataclass
class PeftState:
    config: PeftConfig  # what was injected
    adapter_name: str = "default"  # peft's adapter name for the LoRA layers
    modules: list[str] = field(default_factory=list)  # names of the adapted (or wrapped) submodules
    lora_config: Any = None  # peft's `LoraConfig` when the config uses LoRA (HF peft directory export)
    # pissa/olora: the original base weights and the initial A, B (tuners/lora/init.py `InitRecord`); eva: whether
    # the data-driven A was computed yet. None for the default init.
    lora_init: Any = None


def is_injected(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), PeftState)


def peft_state(model: nn.Module) -> PeftState:
    """The model's `PeftState`; AdapterError when nothing was injected."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, PeftState):
        raise AdapterError("the model has no PEFT state; call medico_peft.tuners.inject(model, cfg) "
                           "or load an adapter first")
    return state


def set_state(model: nn.Module, state: PeftState) -> None:
    setattr(model, STATE_ATTR, state)


def clear_state(model: nn.Module) -> None:
    """Forget the PEFT state, and peft's own `peft_config` dict (as peft's unload does): no LoRA layer is left."""
    for attr in (STATE_ATTR, "peft_config"):
        if attr in model.__dict__:
            delattr(model, attr)
