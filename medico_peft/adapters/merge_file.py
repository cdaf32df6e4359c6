"""Fold an adapter file into the base model it was trained on: `medico-peft adapter merge` as a function."""

from __future__ import annotations

import os

from torch import nn

from ..models import load_model
from ..tuners import merge
from .io import load_adapter, read_adapter


def load_adapter_base(adapter: str | os.PathLike, model: str | None = None, checkpoint: str | os.PathLike | None = None,
                      img_size: int | None = None) -> nn.Module:
    """The base an adapter file records (model name, and input size for ViT) unless overridden.

    With a `checkpoint` and no `model` name, the checkpoint decides the architecture.
    """
    meta, _ = read_adapter(adapter)
    spec = meta["base_spec"]
    name = model or (None if checkpoint else spec["name"])
    size = img_size or (spec["img_size"] if spec.get("family") == "vit" else None)
    return load_model(name, checkpoint=checkpoint, img_size=size)


def merge_adapter_file(adapter: str | os.PathLike, *, model: str | None = None,
                       checkpoint: str | os.PathLike | None = None, img_size: int | None = None,
                       force: bool = False, tolerance: float = 1e-3) -> tuple[nn.Module, float]:
    """(plain merged model, max |merged - unmerged| output difference); raises above `tolerance`.

    The adapter is applied to its base (`load_adapter_base`; the base sha256 must match unless
    `force`), folded with `tuners.merge(strict=True)` (bottleneck adapters refuse) and checked
    with `tuners.merge.verify_merge`.
    """
    from ..tuners.merge import verify_merge

    unmerged = load_adapter(load_adapter_base(adapter, model, checkpoint, img_size), adapter, force=force)
    merged = merge(unmerged, strict=True)
    return merged, verify_merge(unmerged, merged, tolerance=tolerance)
