"""Wrap the selected blocks' attention/MLP submodules with bottleneck adapters, and unwrap them again."""

from __future__ import annotations

from torch import nn

from ..blocks import select_block_names
from ..config import PeftConfig
from .config import WRAPPED
from .layer import Bottleneck, ParallelAdapter, SequentialAdapter


def _block_dim(block: nn.Module) -> int:
    mlp = block.mlp
    first = mlp.lin1 if hasattr(mlp, "lin1") else mlp.fc1
    return first.in_features


def inject_adapters(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Add bottleneck adapters per `cfg`; returns the names of the wrapped submodules."""
    wrapped = []
    for block_name in select_block_names(model, cfg.blocks):
        block = model.get_submodule(block_name)
        dim = _block_dim(block)
        ref = block.mlp.lin1.weight if hasattr(block.mlp, "lin1") else block.mlp.fc1.weight
        for part in WRAPPED[cfg.adapter_kind]:
            adapter = Bottleneck(dim, cfg.bottleneck, cfg.activation, cfg.adapter_scale, cfg.dropout)
            adapter.to(device=ref.device, dtype=ref.dtype)
            cls = ParallelAdapter if cfg.adapter_kind == "parallel" else SequentialAdapter
            setattr(block, part, cls(getattr(block, part), adapter))
            wrapped.append(f"{block_name}.{part}")
    return wrapped


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (ParallelAdapter, SequentialAdapter)) for m in model.modules())


def unwrap_adapters(model: nn.Module) -> int:
    """Replace every adapter wrapper by the module it wraps (adapters discarded); returns the count."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (ParallelAdapter, SequentialAdapter)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.wrapped)
            count += 1
    return count
