"""micro-sam / MedicoSAM LoRA checkpoints -> a medico_peft adapter.

micro-sam's PEFT (`micro_sam.models.peft_sam`) keeps the full SAM state dict, with its LoRA wrapped
around the encoder's fused qkv and (newer versions) the MLP:

    image_encoder.blocks.N.attn.qkv.qkv_proj.{weight,bias}          the frozen fused qkv
    image_encoder.blocks.N.attn.qkv.w_{a,b}_linear_{q,k,v}.weight   A (r, dim) and B (dim, r) per part
    image_encoder.blocks.N.mlp.mlp_layer.lin{1,2}.{weight,bias}     the frozen MLP (newer versions)
    image_encoder.blocks.N.mlp.w_{a,b}_linear_{1,2}.weight          LoRA on lin1 / lin2

with q on the first third of the qkv output, k the middle and v the last, and a scale of 1 (alpha = 1
multiplies B @ A, no division by the rank). Trainer checkpoints wrap the state in `model_state` with
`sam.` (or `module.sam.` under DDP) prefixes. Only the image encoder is frozen there; the decoder and
prompt encoder train fully, so they become `train_decoder` / `train_prompt_encoder` where they differ
from the base. micro-sam has no PEFT for TinyViT models.

Our equivalent: method lora, targets from the parts present (q, k, v, mlp), rank r, alpha = r
(scale alpha/r = 1), the blocks that carry LoRA. The frozen encoder weights in the checkpoint must
equal the base's exactly: that is how the base it was trained on is recognised.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..models.checkpoints import torch_load_checked
from ..tuners import PeftConfig, encoder_block_names, unload
from .io import restore_base_parts, snapshot_base_parts
from .peft_interop import apply_subset, probe_outputs

_QKV = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.w_([ab])_linear_([qkv])\.weight$")
_MLP = re.compile(r"^image_encoder\.blocks\.(\d+)\.mlp\.w_([ab])_linear_([12])\.weight$")
_OTHER_PEFT = ("FacT", "scale", "shift", "down_proj", "up_proj")  # FacT, SSF, AdaptFormer: not LoRA


def _unwrap(raw, source) -> dict:
    if not isinstance(raw, dict):
        raise AdapterError(f"{source}: expected a state dict or a micro-sam trainer checkpoint, got {type(raw).__name__}")
    for key in ("model_state", "model", "state_dict"):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    state = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "sam."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = value
    return state


def read_microsam_lora(path: str | os.PathLike, base_model: nn.Module) -> tuple[PeftConfig, dict, dict, dict]:
    """(our PeftConfig, tensors under our adapter-file keys, the plain SAM state, the LoRA pairs by (block, part))
    for a micro-sam LoRA checkpoint on `base_model`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: micro-sam checkpoint not found")
    state = _unwrap(torch_load_checked(path, "a micro-sam checkpoint"), path)
    if base_model.spec.family != "vit":
        raise AdapterError(f"{path}: micro-sam LoRA exists only for the ViT models (vit_b/l/h); this base is "
                           f"{base_model.spec.name}")
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    plain = {}
    for key, value in state.items():
        match = _QKV.match(key) or _MLP.match(key)
        if match:
            block, ab, part = match.groups()
            lora.setdefault((int(block), {"1": "lin1", "2": "lin2"}.get(part, part)), {})[ab] = value
            continue
        key = key.replace(".attn.qkv.qkv_proj.", ".attn.qkv.").replace(".mlp.mlp_layer.", ".mlp.")
        plain[key] = value
    if not lora:
        other = next((k for k in state if any(t in k for t in _OTHER_PEFT) and k.startswith("image_encoder.")), None)
        what = f" (it holds {other!r}: FacT/SSF/AdaptFormer are not LoRA)" if other else ""
        raise AdapterError(f"{path}: no micro-sam LoRA keys (expected image_encoder.blocks.N.attn.qkv."
                           f"w_a_linear_q.weight and the like){what}; a plain finetuned checkpoint loads with "
                           "load_model(checkpoint=...)")
    base_state = base_model.state_dict()
    for key, value in base_state.items():
        if key not in plain:
            raise AdapterError(f"{path}: {key} missing: not a complete {base_model.spec.name} SAM state dict")
        if plain[key].shape != value.shape:
            raise AdapterError(f"{path}: {key} has shape {tuple(plain[key].shape)}, this {base_model.spec.name} has "
                               f"{tuple(value.shape)}: the checkpoint is for another architecture or size")
    extra = sorted(set(plain) - set(base_state))
    if extra:
        raise AdapterError(f"{path}: unexpected key {extra[0]!r} (not SAM, not micro-sam LoRA)")
    for key, value in base_state.items():
        if key.startswith("image_encoder.") and not torch.equal(plain[key].to(value.dtype), value):
            diff = (plain[key].float() - value.float()).abs().max().item()
            raise AdapterError(f"{path}: its frozen image encoder differs from this base at {key} (max |diff| "
                               f"{diff:.3g}): it was finetuned from another base; load the base it was trained on")
    names = encoder_block_names(base_model)
    rank = None
    tensors: dict[str, torch.Tensor] = {}
    for (block, part), ab in sorted(lora.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterError(f"{path}: block {block} {part}: w_a and w_b must both be present")
        if block >= len(names):
            raise AdapterError(f"{path}: LoRA on block {block}, but {base_model.spec.name} has {len(names)} blocks")
        r = ab["a"].shape[0]
        if rank not in (None, r):
            raise AdapterError(f"{path}: LoRA ranks differ ({rank} and {r}); micro-sam uses one rank")
        rank = r
        module = f"{names[block]}.attn.qkv.{part}" if part in ("q", "k", "v") else f"{names[block]}.mlp.{part}"
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = ab["a"], ab["b"]
    parts = {p for (_, p) in lora}
    targets = [t for t in ("q", "k", "v") if t in parts] + (["mlp"] if parts & {"lin1", "lin2"} else [])
    blocks = sorted({b for (b, _) in lora})
    decoder = any(not torch.equal(plain[k], v) for k, v in base_state.items() if k.startswith("mask_decoder."))
    prompt = any(not torch.equal(plain[k], v) for k, v in base_state.items() if k.startswith("prompt_encoder."))
    for key in base_state:
        if (decoder and key.startswith("mask_decoder.")) or (prompt and key.startswith("prompt_encoder.")):
            tensors[key] = plain[key]
    cfg = PeftConfig(method="lora", rank=rank, alpha=float(rank), targets=targets,
                     blocks="all" if len(blocks) == len(names) else blocks, train_decoder=decoder,
                     train_prompt_encoder=prompt)
    return cfg, tensors, plain, lora


def _merged_reference(base_model: nn.Module, plain: dict, lora: dict) -> nn.Module:
    """The checkpoint's model as plain weights, computed with tensor algebra only: W += B @ A on its rows."""
    ref = copy.deepcopy(base_model)
    state = {k: v.clone() for k, v in plain.items()}
    for (block, part), ab in lora.items():
        delta = ab["b"].float() @ ab["a"].float()
        if part in ("lin1", "lin2"):
            state[f"image_encoder.blocks.{block}.mlp.{part}.weight"] += delta
        else:
            weight = state[f"image_encoder.blocks.{block}.attn.qkv.weight"]
            d = weight.shape[0] // 3
            i = "qkv".index(part)
            weight[i * d:(i + 1) * d] += delta
    ref.load_state_dict(state)
    return ref


def import_microsam_checkpoint(base_model: nn.Module, path: str | os.PathLike, tolerance: float = 1e-3) -> nn.Module:
    """Inject the micro-sam checkpoint's LoRA (and trained decoder parts) into `base_model` (in place).

    Checked on a probe image against the checkpoint's own weights merged with plain tensor algebra;
    AdapterError above `tolerance`, and the base is left as it was.
    """
    cfg, tensors, plain, lora = read_microsam_lora(path, base_model)
    reference = _merged_reference(base_model, plain, lora)
    saved = snapshot_base_parts(base_model)
    apply_subset(base_model, cfg, tensors, path)
    diff = max((a - b).abs().max().item() for a, b in zip(probe_outputs(base_model), probe_outputs(reference)))
    if not diff <= tolerance:
        unload(base_model)
        restore_base_parts(base_model, saved)
        raise AdapterError(f"{path}: the imported adapter and the checkpoint's merged weights differ by {diff:.3g} > "
                           f"tolerance {tolerance:g} on a probe image")
    return base_model
