"""Fold LoRA/DoRA into the base weights (`merge`) or discard all PEFT modules (`unload`).

Both restore fused `qkv` Linears, so a merged LoRA model has exactly official SAM keys (in fp32, also after training on a bf16 frozen base) and
`save_model` writes a `.pth` checkpoint `segment_anything` loads (at the official input size, 1024
for vit_b/l/h; at any other size the resized positional tables do not fit the official builder and
`save_model` writes `.safetensors` only). Bottleneck adapters are extra
computation, not a weight delta: `merge` keeps them (with a warning) or refuses when `strict`.
`verify_merge` is the one check that a merged model still computes what the unmerged one did.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, ExportError
from ..utils.hashing import sha256_state_dict
from .adapter.model import has_adapters, unwrap_adapters
from .base_dtype import restore_base_dtype
from .lora.init import InitRecord, restore_original_weights
from .lora.layer import replace_lora_layers
from .qkv_split import fuse_all
from .state import STATE_ATTR, PeftState, clear_state


def merge(model: nn.Module, strict: bool = False, inplace: bool = False) -> nn.Module:
    """LoRA/DoRA folded into base weights, fused qkv restored -> a plain `MedSam`.

    Works on a copy unless `inplace`, so the unmerged model stays usable for comparison. All
    parameters of the result are trainable again (it is a plain model).
    """
    if has_adapters(model):
        msg = ("bottleneck adapters (method 'adapter') add modules and cannot be merged into SAM weights; "
               "the merged model keeps them and its checkpoint needs medico_peft to load")
        if strict:
            raise AdapterError(msg)
        warnings.warn(msg, stacklevel=2)
    out = model if inplace else copy.deepcopy(model)
    restore_base_dtype(out)  # a bf16 frozen base (train.base_dtype) merges and exports in fp32
    replace_lora_layers(out, merge=True)
    fuse_all(out)
    clear_state(out)
    for p in out.parameters():
        p.requires_grad_(True)
    out.base_sha256 = sha256_state_dict(out.state_dict())
    out.base_source = f"merged:{getattr(model, 'base_source', None)}"
    return out


def unload(model: nn.Module) -> nn.Module:
    """Remove every PEFT module without merging, in place: the encoder is the base encoder again.

    Decoder/prompt-encoder weights trained in place are not reverted (AdapterBank keeps a copy). Base weights
    that a PiSSA/OLoRA init replaced by residuals are restored bit for bit. A bf16 frozen base
    (`base_dtype.cast_frozen_base`) is fp32 again, with its bf16-rounded values.
    """
    state = getattr(model, STATE_ATTR, None)
    record = state.lora_init if isinstance(state, PeftState) else None
    restore_base_dtype(model)
    replace_lora_layers(model, merge=False)
    if isinstance(record, InitRecord):  # pissa/olora left the residual in the base: put the original back
        restore_original_weights(model, record)
    fuse_all(model)
    unwrap_adapters(model)
    clear_state(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class MergeMismatchError(ExportError, ConfigError):
    """Merged and unmerged outputs differ by more than the tolerance.

    An ExportError (the export's fuse step raised that) and a ConfigError (`adapter merge --tolerance`
    raised that), so code written against either check still catches it.
    """


class MergeProbe(NamedTuple):
    """Inputs `verify_merge` runs both models on: every box prompt is decoded on every image."""

    images: torch.Tensor  # (B, 3, S, S) in [0, 1]
    boxes: torch.Tensor  # (K, 4) xyxy pixels of the S×S input


def default_probe(img_size: int) -> MergeProbe:
    """One seeded random image and two boxes (the boxes the export and `adapter merge` checks used)."""
    g = torch.Generator().manual_seed(0)
    s = img_size
    image = torch.rand(1, 3, s, s, generator=g)
    boxes = torch.tensor([[0.2 * s, 0.2 * s, 0.7 * s, 0.8 * s], [0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]])
    return MergeProbe(image, boxes)


@torch.no_grad()
def _probe_outputs(model: nn.Module, probe: MergeProbe) -> list[torch.Tensor]:
    outputs = []
    for i in range(probe.images.shape[0]):
        emb = model.encode(probe.images[i:i + 1])
        sparse, dense = model.embed_prompts(boxes=probe.boxes)
        low, iou = model.decode_all_tokens(emb, sparse, dense)  # single-mask and multimask tokens
        outputs += [emb, low, iou]
    return outputs


def verify_merge(unmerged_model: nn.Module, merged_model: nn.Module, *, tolerance: float,
                 probe: MergeProbe | tuple | None = None) -> float:
    """Largest |difference| between the two models' outputs on `probe`; MergeMismatchError above `tolerance`.

    Compared: image embeddings, low-res mask logits of all four mask tokens and IoU predictions, for
    every box of the probe on every image (default: `default_probe`). Both models are put in eval mode.
    """
    probe = default_probe(unmerged_model.img_size) if probe is None else MergeProbe(*probe)
    device = next(unmerged_model.parameters()).device
    probe = MergeProbe(probe.images.to(device), probe.boxes.to(device))
    unmerged_model.eval()
    merged_model.eval()
    pairs = zip(_probe_outputs(unmerged_model, probe), _probe_outputs(merged_model, probe))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    if not diff <= tolerance:
        raise MergeMismatchError(f"merged and unmerged outputs differ by {diff:.3g} > tolerance {tolerance:g}; "
                                 "the merge is not exact for this adapter")
    return diff
