"""`PeftConfig`: one validated description of how a model is finetuned.

It is written verbatim (as JSON) into every adapter file, so it must round-trip through
`to_dict`/`from_dict` and refuse anything it does not understand: an unknown key in a file
from a future version is an error, not a silently ignored option.

Defaults live here and nowhere else; each field's `help` is what `medico-peft --help` prints.
Alpha policy: `alpha=None` (the default) means alpha = rank (LoRA scale alpha/rank = 1, or
alpha/sqrt(rank) with rsLoRA); it is resolved on construction, so `to_dict` always stores a number
and adapter files written with an explicit alpha load unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..utils.config import check_fields, config_error, from_mapping, option

METHODS = ("lora", "dora", "adapter", "decoder_only", "full")
LORA_METHODS = ("lora", "dora")
TARGETS = ("q", "k", "v", "qkv", "proj", "mlp")
ADAPTER_KINDS = ("parallel", "sequential")
ACTIVATIONS = ("relu", "gelu")
# LoRA initialisations (peft's `init_lora_weights`): default = A random, B = 0 (the model starts at the base);
# pissa / olora = A, B from an SVD / QR of the base weight, which keeps W - s·BA as a residual base (saved
# adapters are converted to a plain LoRA on the original base, tuners/lora/init.py); eva = A from an SVD of
# the layer inputs on training batches, B = 0.
LORA_INITS = ("default", "pissa", "olora", "eva")

_POSITIVE_INT = "must be a positive integer, got {value!r}"
_BOOL = "must be true or false, got {value!r}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_targets(targets) -> tuple:
    """Ordered, de-duplicated target names from a list or a comma string ('q,v')."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise config_error("targets", f"must be a non-empty list of {', '.join(TARGETS)}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise config_error("targets", f"unknown target {unknown[0]!r}; valid targets: {', '.join(TARGETS)}")
    if "qkv" in targets and any(t in targets for t in ("q", "k", "v")):
        raise config_error("targets", "'qkv' (the fused layer) cannot be combined with 'q', 'k' or 'v' "
                                      "(the split projections); choose one")
    return tuple(dict.fromkeys(targets))


def parse_blocks(blocks):
    """'all', N (last N blocks) or sorted block indices; also from text: 'all', '2', '3,' or '1,5'."""
    if isinstance(blocks, str):
        text = blocks.strip()
        if text == "all":
            return "all"
        try:
            blocks = [int(t) for t in text.split(",") if t.strip()] if "," in text else int(text)
        except ValueError:
            pass  # reported below with the original text
    if _is_int(blocks):
        if blocks <= 0:
            raise config_error("blocks", f"the number of last blocks must be positive, got {blocks}")
        return blocks
    if isinstance(blocks, (list, tuple)) and blocks and all(_is_int(b) for b in blocks):
        if any(b < 0 for b in blocks):
            raise config_error("blocks", f"block indices must be >= 0, got {list(blocks)}")
        return tuple(sorted(set(blocks)))
    raise config_error("blocks", f"expected 'all', a positive integer (last N blocks) or a non-empty list of "
                                 f"block indices, got {blocks!r}")


@dataclass(frozen=True)
class PeftConfig:
    """How to finetune: method, LoRA options, bottleneck-adapter options, and what else trains.

    `targets` and the LoRA fields apply to `lora`/`dora` (and to the decoder when `decoder_lora`);
    the adapter fields apply to `adapter`; `blocks` selects encoder attention blocks for both.
    """

    method: str = option("lora", choices=METHODS, help="lora | dora | adapter | decoder_only | full",
                         error="unknown method {value!r}; valid methods: {choices}")
    rank: int = option(8, min=1, help="LoRA rank r", error=_POSITIVE_INT)
    alpha: float | None = option(None, gt=0, help="LoRA alpha; default: equal to the rank (scale alpha/rank = 1)",
                                 error="must be a positive number, got {value!r}")
    dropout: float = option(0.0, min=0.0, lt=1.0, help="dropout on the LoRA input",
                            error="must be a number in [0, 1), got {value!r}")
    use_rslora: bool = option(False, help="scale LoRA by alpha/sqrt(rank) instead of alpha/rank", error=_BOOL)
    init: str = option("default", choices=LORA_INITS,
                       help="LoRA initialisation: default (B = 0) | pissa (A, B from the base weight's top singular "
                            "vectors; the base keeps the residual) | olora (the same from a QR decomposition) | eva "
                            "(A from an SVD of the layer inputs on the first training batches, B = 0)",
                       error="unknown LoRA init {value!r}; valid: {choices}")
    eva_batches: int = option(4, min=1, help="EVA: number of training batches whose encoder-layer inputs the SVD "
                                             "uses (init eva only)", error=_POSITIVE_INT)
    targets: tuple = option(("q", "v"), parse=parse_targets,
                            help="comma list of q, k, v, qkv, proj, mlp (default q,v)")
    blocks: object = option("all", parse=parse_blocks,
                            help="'all', N (last N blocks) or a comma list of indices ('3,' = block 3)")
    train_decoder: bool = option(True, help="train the mask decoder fully", error=_BOOL)
    train_prompt_encoder: bool = option(False, help="train the prompt encoder", error=_BOOL)
    decoder_lora: bool = option(False, help="LoRA on the mask decoder instead of training it fully", error=_BOOL)
    adapter_kind: str = option("parallel", choices=ADAPTER_KINDS, help="parallel (AdaptFormer) | sequential (Houlsby)",
                               error="unknown kind {value!r}; valid kinds: {choices}")
    bottleneck: int = option(64, min=1, help="bottleneck adapter width", error=_POSITIVE_INT)
    activation: str = option("relu", choices=ACTIVATIONS, help="bottleneck activation: relu | gelu",
                             error="unknown activation {value!r}; valid: {choices}")
    adapter_scale: float = option(0.1, help="output scale of parallel adapters",
                                  error="must be a finite number, got {value!r}")

    def __post_init__(self):
        check_fields(self)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))  # the alpha policy: alpha = rank
        if self.method == "decoder_only" and not (self.train_decoder or self.decoder_lora or self.train_prompt_encoder):
            raise config_error("train_decoder", "method 'decoder_only' with train_decoder=false and "
                                                "decoder_lora=false trains nothing")
        if self.init != "default" and not self.uses_lora:
            raise config_error("init", f"LoRA initialisation {self.init!r} needs LoRA layers; method "
                                       f"{self.method!r} without decoder_lora has none (use init default)")
        if self.init == "eva" and self.decoder_lora:
            raise config_error("init", "eva initialises LoRA from the image encoder's layer inputs on training "
                                       "images; the mask decoder's LoRA layers (decoder_lora) see prompt-dependent "
                                       "tokens no image batch defines, so eva cannot initialise them: use "
                                       "decoder_lora=false, or init default/pissa/olora")

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
    def from_dict(cls, data: dict, prefix: str = "") -> "PeftConfig":
        """From a mapping (an adapter file's JSON, a recipe's `peft` section); `prefix` qualifies error keys."""
        return from_mapping(cls, data, prefix=prefix, what="peft config", sort_keys=True)
