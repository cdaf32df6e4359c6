"""Bottleneck adapter modules.

Wrappers keep the original module as `wrapped`, so its weights stay reachable under
`<name>.wrapped.*` and `unwrap` restores the official key names exactly.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Bottleneck(nn.Module):
    """down (dim -> width) -> activation -> dropout -> up (width -> dim), times `scale`.

    `up` starts at zero, so a freshly injected adapter adds exactly nothing.
    """

    def __init__(self, dim: int, width: int, activation: str = "relu", scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class ParallelAdapter(nn.Module):
    """AdaptFormer: `mlp(x) + adapter(x)`, the adapter sitting beside the MLP.

    TinyViT's MLP normalises its own input (`mlp.norm`); the adapter then sees that normalised
    input too, as it does in ViT where the block normalises before calling the MLP.
    """

    def __init__(self, wrapped: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.wrapped = wrapped
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.wrapped, "norm", None)
        return self.wrapped(x) + self.adapter(norm(x) if norm is not None else x)


class SequentialAdapter(nn.Module):
    """Houlsby: `h + adapter(h)` with `h = wrapped(x)`, inserted after attention or after the MLP."""

    def __init__(self, wrapped: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.wrapped = wrapped
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.wrapped(*args, **kwargs)
        return h + self.adapter(h)

    def __getattr__(self, name):
        # Attention modules expose attributes their block reads (e.g. TinyViT's qkv_layout).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)
