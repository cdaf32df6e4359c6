"""Fold LoRA/DoRA into the base weights (`merge`) or discard all PEFT modules (`unload`).

Both restore fused `qkv` Linears, so a merged LoRA model has exactly official SAM keys and
`save_model` writes a checkpoint `segment_anything` loads. Bottleneck adapters are extra
computation, not a weight delta: `merge` keeps them (with a warning) or refuses when `strict`.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..errors import AdapterError
from ..utils.hashing import sha256_state_dict
from .adapter.model import has_adapters, unwrap_adapters
from .lora.layer import replace_lora_layers
from .qkv_split import fuse_all

_PEFT_ATTRS = ("peft_config", "peft_lora_config", "peft_adapter_name", "peft_modules")


def _clear_peft_attrs(model: nn.Module) -> None:
    for attr in _PEFT_ATTRS:
        if attr in model.__dict__:
            delattr(model, attr)


def merge(model: nn.Module, strict: bool = False, inplace: bool = False) -> nn.Module:
    """LoRA/DoRA folded into base weights, fused qkv restored -> a plain `MedSam`.

    Works on a copy unless `inplace`, so the unmerged model stays usable for comparison. All
    parameters of the result are trainable again (it is a plain model).
    """
    if has_adapters(model):
        msg = ("bottleneck adapters (method 'adapter') add modules and cannot be merged into SAM weights; "
               "the merged model keeps them and its checkpoint needs medico_peft to load")
        if strict:
            raise AdapterError(msg)
        warnings.warn(msg, stacklevel=2)
    out = model if inplace else copy.deepcopy(model)
    replace_lora_layers(out, merge=True)
    fuse_all(out)
    _clear_peft_attrs(out)
    for p in out.parameters():
        p.requires_grad_(True)
    out.base_sha256 = sha256_state_dict(out.state_dict())
    out.base_source = f"merged:{getattr(model, 'base_source', None)}"
    return out


def unload(model: nn.Module) -> nn.Module:
    """Remove every PEFT module without merging, in place: the encoder is the base encoder again.

    Decoder/prompt-encoder weights trained in place are not reverted (AdapterBank keeps a copy).
    """
    replace_lora_layers(model, merge=False)
    fuse_all(model)
    unwrap_adapters(model)
    _clear_peft_attrs(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
