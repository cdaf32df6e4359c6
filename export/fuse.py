"""Fuse a model and its adapter into plain weights for export.

LoRA/DoRA fold exactly into the frozen weights (`medico_peft.tuners.merge`), so the exported
graph has the base model's cost; bottleneck adapters cannot fold and stay in the graph as ops.
The fused model is checked against the unfused one on a random input before it is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from medico_peft.errors import ExportError

FUSE_ATOL = 1e-4


def fuse(model, adapter: str | os.PathLike | None = None, check: bool = True):
    """(model with LoRA folded, info dict with the adapter's sha256 and method)."""
    from medico_peft.utils.hashing import sha256_file

    info: dict = {"adapter": None, "base_sha256": getattr(model, "base_sha256", None)}
    if adapter is not None:
        try:
            from medico_peft.adapters import load_adapter
        except ImportError as exc:
            raise ExportError(f"{adapter}: adapters need medico_peft.adapters ({exc})") from None
        model = load_adapter(model, adapter)  # verifies the base sha256 (AdapterError otherwise)
        info["adapter"] = {"path": str(Path(adapter)), "sha256": sha256_file(adapter)}
    try:
        from medico_peft.tuners import is_injected, merge
    except ImportError:  # tuners not installed: nothing can be injected either
        return model.eval(), info
    if not is_injected(model):
        return model.eval(), info
    model.eval()
    info["method"] = model.peft_config.method
    if model.peft_config.method == "adapter":
        info["kept_as_ops"] = "bottleneck adapters (cannot fold into weights)"
    probe = _probe_outputs(model) if check else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns that bottleneck adapters stay: expected here
        merged = merge(model).eval()
    info["merged_sha256"] = merged.base_sha256
    if check:
        err = max((a - b).abs().max().item() for a, b in zip(probe, _probe_outputs(merged)))
        info["fuse_max_abs_error"] = err
        if err > FUSE_ATOL:
            raise ExportError(f"fusing the adapter changed the outputs by {err:.3g} (> {FUSE_ATOL}); "
                              "the merge is not exact for this adapter")
    return merged, info


@torch.no_grad()
def _probe_outputs(model):
    g = torch.Generator().manual_seed(0)
    s = model.img_size
    x = torch.rand(1, 3, s, s, generator=g)
    emb = model.encode(x)
    sparse, dense = model.embed_prompts(boxes=torch.tensor([[0.2 * s, 0.2 * s, 0.7 * s, 0.8 * s]]))
    low, iou = model.decode(emb, sparse, dense, multimask=True)
    return emb, low, iou
