"""LoRA and DoRA through HF peft: config translation, layer handling, injection."""

from .model import inject_lora, lora_target_regex

__all__ = ["inject_lora", "lora_target_regex"]
