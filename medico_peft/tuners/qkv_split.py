"""Reversible split of a fused `qkv` Linear into `q`, `k`, `v` Linear children.

peft adapts whole Linear layers; SAMed-style LoRA adapts only q and v of the fused qkv. Splitting
the fused layer into three named children lets peft target `...attn.qkv.q` and `...attn.qkv.v`
directly, and `fuse` puts the (merged) rows back for a plain SAM checkpoint.

Two layouts of the fused output:
- contiguous (segment_anything ViT): [q | k | v], each `dim` wide;
- interleaved (TinyViT): per head h, [q_h (key_dim) | k_h (key_dim) | v_h (d)].
`SplitQkv.forward` reproduces exactly the fused layer's output layout for both.
"""

from __future__ import annotations

import torch
from torch import nn


def layout_of(attn: nn.Module) -> dict:
    """The fused layout of an attention module (TinyViT declares `qkv_layout`; ViT is contiguous)."""
    layout = getattr(attn, "qkv_layout", None)
    if layout is not None:
        return dict(layout)
    out = attn.qkv.out_features
    return {"kind": "contiguous", "num_heads": getattr(attn, "num_heads", 1), "sizes": (out // 3,) * 3}


def _row_indices(layout: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the fused weight that belong to q, k and v (in their split order)."""
    sq, sk, sv = layout["sizes"]
    if layout["kind"] == "contiguous":
        return (torch.arange(0, sq), torch.arange(sq, sq + sk), torch.arange(sq + sk, sq + sk + sv))
    heads = layout["num_heads"]
    per_head = sq + sk + sv
    base = torch.arange(heads).unsqueeze(1) * per_head
    q = (base + torch.arange(sq)).reshape(-1)
    k = (base + sq + torch.arange(sk)).reshape(-1)
    v = (base + sq + sk + torch.arange(sv)).reshape(-1)
    return q, k, v


def _linear_from_rows(fused: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(fused.in_features, len(rows), bias=fused.bias is not None,
                    device=fused.weight.device, dtype=fused.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(fused.weight[rows])
        if fused.bias is not None:
            lin.bias.copy_(fused.bias[rows])
    lin.weight.requires_grad_(fused.weight.requires_grad)
    if fused.bias is not None:
        lin.bias.requires_grad_(fused.bias.requires_grad)
    return lin


class SplitQkv(nn.Module):
    """Three Linears (`q`, `k`, `v`) whose concatenated output equals the fused layer's output."""

    def __init__(self, fused: nn.Linear, layout: dict):
        super().__init__()
        self.layout = {"kind": layout["kind"], "num_heads": int(layout["num_heads"]),
                       "sizes": tuple(int(s) for s in layout["sizes"])}
        rq, rk, rv = _row_indices(self.layout)
        self.q = _linear_from_rows(fused, rq)
        self.k = _linear_from_rows(fused, rk)
        self.v = _linear_from_rows(fused, rv)
        self.in_features = fused.in_features
        self.out_features = fused.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.layout["kind"] == "contiguous":
            return torch.cat([q, k, v], dim=-1)
        h = self.layout["num_heads"]
        lead = q.shape[:-1]
        per_head = torch.cat([q.reshape(*lead, h, -1), k.reshape(*lead, h, -1), v.reshape(*lead, h, -1)], dim=-1)
        return per_head.reshape(*lead, self.out_features)

    def fuse(self) -> nn.Linear:
        """A plain fused Linear with the current q/k/v weights (which must be plain Linears)."""
        parts = [self.q, self.k, self.v]
        for name, part in zip("qkv", parts):
            if type(part) is not nn.Linear:
                raise TypeError(f"qkv.{name} is a {type(part).__name__}; merge or unload its adapter before fusing")
        ref = self.q.weight
        fused = nn.Linear(self.in_features, self.out_features, bias=self.q.bias is not None,
                          device=ref.device, dtype=ref.dtype)
        rows = torch.cat(_row_indices(self.layout))
        with torch.no_grad():
            fused.weight[rows] = torch.cat([p.weight for p in parts])
            if fused.bias is not None:
                fused.bias[rows] = torch.cat([p.bias for p in parts])
        return fused


def split_qkv(attn: nn.Module) -> SplitQkv:
    """Replace `attn.qkv` by its `SplitQkv` (idempotent) and return it."""
    if isinstance(attn.qkv, SplitQkv):
        return attn.qkv
    split = SplitQkv(attn.qkv, layout_of(attn))
    attn.qkv = split
    return split


def fuse_all(model: nn.Module) -> int:
    """Turn every `SplitQkv` in `model` back into a fused Linear; returns how many were fused."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitQkv):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.fuse())
            count += 1
    return count


def row_indices(layout: dict) -> dict[str, torch.Tensor]:
    """{'q', 'k', 'v'}: the rows of the fused qkv weight (and output) that belong to each part."""
    return dict(zip("qkv", _row_indices(layout)))
