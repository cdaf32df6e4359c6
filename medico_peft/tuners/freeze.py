"""Which parameters train: the freeze policy, applied after injection.

- encoder base weights: always frozen (except `full`);
- PEFT parameters (LoRA/DoRA, bottleneck adapters): trainable;
- mask decoder: trainable when `train_decoder`, unless `decoder_lora` (then only its LoRA trains);
- prompt encoder: frozen unless `train_prompt_encoder`;
- `full`: everything trainable (the baseline PEFT is compared with).
BatchNorm running statistics are not parameters; `MedSam.train()` keeps them in eval mode.
"""

from __future__ import annotations

from torch import nn

from .config import PeftConfig

PEFT_PARAM_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def is_peft_param(name: str) -> bool:
    """LoRA/DoRA tensors (peft) and bottleneck adapter tensors (ours)."""
    parts = name.split(".")
    return any(m in parts for m in PEFT_PARAM_MARKERS) or "adapter" in parts


def apply_freeze_policy(model: nn.Module, cfg: PeftConfig) -> None:
    for name, param in model.named_parameters():
        if cfg.method == "full":
            trainable = True
        elif is_peft_param(name):
            trainable = True
        elif name.startswith("mask_decoder."):
            trainable = cfg.train_decoder and not cfg.decoder_lora
        elif name.startswith("prompt_encoder."):
            trainable = cfg.train_prompt_encoder
        else:
            trainable = False
        param.requires_grad_(trainable)
