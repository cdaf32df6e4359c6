"""Shared helpers for the tuner/adapter tests (not a test module)."""

from __future__ import annotations

import copy

import torch

METHOD_CASES = {
    "lora_qv": dict(method="lora", targets=["q", "v"]),
    "lora_qkv": dict(method="lora", targets=["qkv"]),
    "lora_proj_mlp": dict(method="lora", targets=["proj", "mlp"]),
    "dora": dict(method="dora"),
    "rslora": dict(method="lora", use_rslora=True, alpha=16.0),
    "adapter_parallel": dict(method="adapter", adapter_kind="parallel"),
    "adapter_sequential": dict(method="adapter", adapter_kind="sequential", activation="gelu"),
    "decoder_lora": dict(method="decoder_only", decoder_lora=True),
}

_BASES: dict = {}


def base(name: str):
    """A fresh copy of a loaded base model (loading once per session; deepcopy keeps base_sha256)."""
    from medico_peft.models import load_model

    if name not in _BASES:
        _BASES[name] = load_model(name)
    return copy.deepcopy(_BASES[name])


def inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.img_size
    return torch.rand(1, 3, s, s, generator=g), torch.tensor([[0.1 * s, 0.2 * s, 0.8 * s, 0.7 * s]])


def logits(model, seed: int = 0) -> torch.Tensor:
    image, box = inputs(model, seed)
    model.eval()
    with torch.no_grad():
        return model(image, boxes=box)[0]


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trained tensor away from its init, as training would (zero-init B/up included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
