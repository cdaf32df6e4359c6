"""PEFT for a `SemanticSam`: the encoder method goes into `model.sam` as for interactive training; the head trains.

`inject_semantic(model, cfg)` injects `cfg` into `model.sam` (so LoRA/DoRA/adapter/frozen/full
encoders behave exactly as in interactive training) and then sets what trains:
- the head: always;
- `sam.mask_decoder` and `sam.prompt_encoder`: only with `joint=True` (interactive and semantic
  objectives together); otherwise they are unused by the semantic forward and frozen, so neither
  trainable counts nor adapter files carry them. The frozen encoder is `method: decoder_only`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PeftConfig
from .inject import inject


def inject_semantic(model: nn.Module, cfg: PeftConfig | dict, joint: bool = False) -> nn.Module:
    if isinstance(cfg, dict):
        cfg = PeftConfig.from_dict(cfg)
    inject(model.sam, cfg)
    set_semantic_trainable(model, joint)
    return model


def set_semantic_trainable(model: nn.Module, joint: bool = False) -> None:
    if not joint:
        for part in (model.sam.mask_decoder, model.sam.prompt_encoder):
            for p in part.parameters():
                p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)


def semantic_trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors by name relative to the `SemanticSam`: `sam.<...>` (PEFT, trained SAM parts) and `head.<...>`."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
