"""Inject LoRA/DoRA with `peft.inject_adapter_in_model` using anchored regexes built from the block selection."""

from __future__ import annotations

import re
import warnings

from torch import nn

from ...errors import ConfigError
from ..blocks import select_block_names, target_module_paths
from ..config import PeftConfig
from ..qkv_split import split_qkv

# The mask decoder's two-way transformer: attention projections and MLPs.
DECODER_LORA_REGEX = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
    r"|final_attn_token_to_image)\.(?:q_proj|k_proj|v_proj|out_proj)"
    r"|mask_decoder\.transformer\.layers\.\d+\.mlp\.(?:lin1|lin2)"
)


def _alternation(items) -> str:
    return "(?:" + "|".join(re.escape(i) for i in items) + ")"


def lora_target_regex(model: nn.Module, cfg: PeftConfig) -> str:
    """One regex full-matching exactly the module names LoRA goes on (encoder part and/or decoder)."""
    parts = []
    if cfg.method in ("lora", "dora"):
        blocks = select_block_names(model, cfg.blocks)
        paths = target_module_paths(model.spec.family, cfg.targets)
        parts.append(_alternation(blocks) + r"\." + _alternation(paths))
    if cfg.decoder_lora:
        parts.append(DECODER_LORA_REGEX)
    return "^(?:" + "|".join(parts) + ")$"


def _matched(model: nn.Module, regex: str) -> list[str]:
    pattern = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def inject_lora(model: nn.Module, cfg: PeftConfig, adapter_name: str = "default") -> tuple[list[str], object]:
    """Split fused qkv where q/k/v are targeted, then let peft inject LoRA/DoRA.

    Returns (adapted module names, init record): an `init.InitRecord` for pissa/olora (original weights and
    initial A, B), an unfinished `init.EvaRecord` for eva, None for the default init.
    """
    from peft import inject_adapter_in_model

    from .config import to_lora_config
    from .init import MUTATING, EvaRecord, check_rank_fits, record_initial, snapshot_weights

    if cfg.method in ("lora", "dora") and any(t in cfg.targets for t in ("q", "k", "v")):
        for block_name in select_block_names(model, cfg.blocks):
            split_qkv(model.get_submodule(block_name).attn)
    regex = lora_target_regex(model, cfg)
    matched = _matched(model, regex)
    if not matched:
        raise ConfigError(f"targets: the pattern {regex} matches no Linear module of {model.spec.name}")
    original = None
    if cfg.init in MUTATING:
        check_rank_fits(model, matched, cfg.rank, cfg.init)
        original = snapshot_weights(model, matched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about custom models without a HF config
        inject_adapter_in_model(to_lora_config(cfg, regex), model, adapter_name=adapter_name)
    if original is not None:
        return matched, record_initial(model, matched, adapter_name, cfg.init, original)
    return matched, (EvaRecord() if cfg.init == "eva" else None)
