"""Translate our `PeftConfig` into peft's `LoraConfig` (peft imported lazily: it costs seconds)."""

from __future__ import annotations

from ..config import PeftConfig


def to_lora_config(cfg: PeftConfig, target_regex: str):
    """peft `LoraConfig` for the LoRA family; DoRA when `cfg.method == 'dora'`.

    `target_modules` is a single regex: peft full-matches it against every module name, so names
    are anchored and `patch_embed.proj` can never be hit by accident.
    """
    from peft import LoraConfig

    from .init import PEFT_INIT

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.method == "dora",
        target_modules=target_regex,
        bias="none",
        # default/eva: B = 0, the model starts exactly at the base; pissa/olora: A, B from the base weight,
        # which keeps the residual (tuners/lora/init.py)
        init_lora_weights=PEFT_INIT[cfg.init],
    )
