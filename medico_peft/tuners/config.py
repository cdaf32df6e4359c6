"""`PeftConfig`: one validated description of how a model is finetuned.

It is written verbatim (as JSON) into every adapter file, so it must round-trip through
`to_dict`/`from_dict` and refuse anything it does not understand: an unknown key in a file
from a future version is an error, not a silently ignored option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError

METHODS = ("lora", "dora", "adapter", "decoder_only", "full")
LORA_METHODS = ("lora", "dora")
TARGETS = ("q", "k", "v", "qkv", "proj", "mlp")
ADAPTER_KINDS = ("parallel", "sequential")
ACTIVATIONS = ("relu", "gelu")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class PeftConfig:
    """How to finetune: method, LoRA options, bottleneck-adapter options, and what else trains.

    `targets` and the LoRA fields apply to `lora`/`dora` (and to the decoder when `decoder_lora`);
    the adapter fields apply to `adapter`; `blocks` selects encoder attention blocks for both.
    """

    method: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple = ("q", "v")
    blocks: object = "all"  # "all" | int N (last N blocks) | tuple of block indices
    train_decoder: bool = True
    train_prompt_encoder: bool = False
    decoder_lora: bool = False
    adapter_kind: str = "parallel"
    bottleneck: int = 64
    activation: str = "relu"
    adapter_scale: float = 0.1

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if not _is_int(self.rank) or self.rank <= 0:
            raise ConfigError(f"rank: must be a positive integer, got {self.rank!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha: must be a positive number, got {self.alpha!r}")
        set_("alpha", float(self.alpha))
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        set_("dropout", float(self.dropout))
        for name in ("use_rslora", "train_decoder", "train_prompt_encoder", "decoder_lora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        set_("targets", self._check_targets(self.targets))
        set_("blocks", self._check_blocks(self.blocks))
        if self.adapter_kind not in ADAPTER_KINDS:
            raise ConfigError(f"adapter_kind: unknown kind {self.adapter_kind!r}; valid kinds: {', '.join(ADAPTER_KINDS)}")
        if not _is_int(self.bottleneck) or self.bottleneck <= 0:
            raise ConfigError(f"bottleneck: must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not _is_number(self.adapter_scale):
            raise ConfigError(f"adapter_scale: must be a finite number, got {self.adapter_scale!r}")
        set_("adapter_scale", float(self.adapter_scale))
        if self.method == "decoder_only" and not (self.train_decoder or self.decoder_lora or self.train_prompt_encoder):
            raise ConfigError("train_decoder: method 'decoder_only' with train_decoder=false and decoder_lora=false "
                              "trains nothing")

    @staticmethod
    def _check_targets(targets) -> tuple:
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ConfigError(f"targets: must be a non-empty list of {', '.join(TARGETS)}, got {targets!r}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"targets: unknown target {unknown[0]!r}; valid targets: {', '.join(TARGETS)}")
        if "qkv" in targets and any(t in targets for t in ("q", "k", "v")):
            raise ConfigError("targets: 'qkv' (the fused layer) cannot be combined with 'q', 'k' or 'v' "
                              "(the split projections); choose one")
        return tuple(dict.fromkeys(targets))  # ordered, de-duplicated

    @staticmethod
    def _check_blocks(blocks):
        if blocks == "all":
            return "all"
        if _is_int(blocks):
            if blocks <= 0:
                raise ConfigError(f"blocks: the number of last blocks must be positive, got {blocks}")
            return blocks
        if isinstance(blocks, (list, tuple)) and blocks and all(_is_int(b) for b in blocks):
            if any(b < 0 for b in blocks):
                raise ConfigError(f"blocks: block indices must be >= 0, got {list(blocks)}")
            return tuple(sorted(set(blocks)))
        raise ConfigError(f"blocks: expected 'all', a positive integer (last N blocks) or a non-empty list of "
                          f"block indices, got {blocks!r}")

    # --- properties used by the injectors ------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        """True when peft's LoRA layers are injected anywhere (encoder or decoder)."""
        return self.method in LORA_METHODS or self.decoder_lora

    @property
    def mergeable(self) -> bool:
        """Bottleneck adapters add modules; everything else folds into plain SAM weights."""
        return self.method != "adapter"

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["targets"] = list(self.targets)
        if isinstance(self.blocks, tuple):
            data["blocks"] = list(self.blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PeftConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"peft config: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"peft config: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
        return cls(**data)
