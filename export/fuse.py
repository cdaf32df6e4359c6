"""Fuse a model and its adapter into plain weights for export.

LoRA/DoRA fold exactly into the frozen weights (`medico_peft.tuners.merge`), so the exported
graph has the base model's cost; bottleneck adapters cannot fold and stay in the graph as ops.
The fused model is checked against the unfused one (`verify_merge`) before it is used.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..tuners import is_injected, merge, peft_state, verify_merge
from ..tuners.base_dtype import frozen_base_dtype, restore_base_dtype
from ..utils.hashing import sha256_file, sha256_state_dict

FUSE_ATOL = 1e-4


def _base_sha256_now(model) -> str | None:
    """State sha256 of a plain model's weights as they are now (not the hash cached at load time);
    for a model that already carries an adapter, the hash recorded when its base was loaded."""
    if is_injected(model):
        return getattr(model, "base_sha256", None)
    return sha256_state_dict(model.state_dict())


def fuse(model, adapter: str | os.PathLike | None = None, check: bool = True):
    """(model with LoRA folded, info dict with the adapter's sha256 and method)."""
    info: dict = {"adapter": None, "base_sha256": _base_sha256_now(model)}
    if adapter is not None:
        model = load_adapter(model, adapter)  # verifies the base sha256 (AdapterError otherwise)
        info["adapter"] = {"path": str(Path(adapter)), "sha256": sha256_file(adapter)}
    if not is_injected(model):
        return model.eval(), info
    if frozen_base_dtype(model) != torch.float32:
        # Trained on a bf16 frozen base (train.base_dtype): fold and check in fp32 on a copy, so the check
        # compares two fp32 computations of the same (bf16-rounded) base and the caller's model is untouched.
        model = copy.deepcopy(model)
        restore_base_dtype(model)
    model.eval()
    method = peft_state(model).config.method
    info["method"] = method
    if method == "adapter":
        info["kept_as_ops"] = "bottleneck adapters (cannot fold into weights)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns that bottleneck adapters stay: expected here
        merged = merge(model).eval()
    info["merged_sha256"] = merged.base_sha256
    if check:  # MergeMismatchError (an ExportError) above FUSE_ATOL
        info["fuse_max_abs_error"] = verify_merge(model, merged, tolerance=FUSE_ATOL)
    return merged, info


def fuse_semantic(model, adapter_path: str | os.PathLike | None = None, check: bool = True):
    """(a `SemanticSam` with its encoder LoRA/DoRA folded, info dict) for the semantic export.

    PEFT state may sit on the SemanticSam or on its `sam`; either way the result is a plain SemanticSam
    (bottleneck adapters stay as ops). `check`: the whole semantic forward (encoder taps + head) of
    the merged model is compared with the unmerged one on fixed random images; MergeMismatchError above
    FUSE_ATOL. `adapter_path` (already loaded into `model`) is recorded with its sha256.
    """
    import copy

    import torch

    from ..tuners.merge import MergeMismatchError

    info: dict = {"adapter": None, "base_sha256": getattr(model.sam, "base_sha256", None), "task": "semantic"}
    if adapter_path is not None:
        info["adapter"] = {"path": str(Path(adapter_path)), "sha256": sha256_file(adapter_path)}
    holder = model if is_injected(model) else model.sam if is_injected(model.sam) else None
    model.eval()
    if holder is None:
        return model, info
    method = peft_state(holder).config.method
    info["method"] = method
    if method == "adapter":
        info["kept_as_ops"] = "bottleneck adapters (cannot fold into weights)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns that bottleneck adapters stay: expected here
        if holder is model:
            merged = merge(model).eval()
        else:  # a copy whose encoder is merged in place; the unmerged model stays usable for the check
            merged = copy.deepcopy(model)
            merge(merged.sam, inplace=True)
            merged.eval()
    info["merged_sha256"] = sha256_state_dict(merged.state_dict())
    if check:
        gen = torch.Generator().manual_seed(0)
        s = model.sam.img_size
        images = torch.rand(2, 3, s, s, generator=gen)
        images[1, :, :, s // 2:] = 0  # a padded (wide) image, as the runtime feeds them
        device = next(model.parameters()).device
        with torch.no_grad():
            want = model(images.to(device)).float()
            got = merged(images.to(device)).float()
        err = float((want - got).abs().max())
        if not err <= FUSE_ATOL:
            raise MergeMismatchError(f"semantic merge: merged model's class logits differ from the unmerged model's by "
                                     f"{err:.3g} > {FUSE_ATOL:g}; nothing was exported")
        info["fuse_max_abs_error"] = err
    return merged.eval(), info
