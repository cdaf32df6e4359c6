"""A cheaper frozen base: the image encoder's frozen Linear/Conv weights stored in bf16.

`cast_frozen_base(model, torch.bfloat16)` converts, in place, the weight (and bias) of every
Linear/Conv module of the image encoder whose own parameters are all frozen: the base layers under
LoRA/DoRA, the fused or split qkv, MLPs, patch embedding, the neck convs. What trains stays fp32
(LoRA A/B, DoRA magnitudes, bottleneck adapters, a trained decoder), and so do LayerNorm and
BatchNorm parameters (fp16/bf16 norms are a known trap: keep them fp32), embeddings, positional
tables and attention biases. The parameter keeps its identity (so `requires_grad`, the module tree
and `state_dict` keys are unchanged); only its storage is replaced, and the fp32 storage is freed.

Compute: a forward pre-hook casts a module's input to the weight's dtype, and a forward hook casts
its output back to fp32, so the frozen bf16 weight enters the matmul/convolution as it is (no fp32
copy is made) and everything between the frozen layers (norms, softmax, residuals, the LoRA branch
added on top of the base output) runs in fp32. Under autocast (`memory.precision: bf16`) both hooks
stand aside and autocast decides.

`restore_base_dtype(model)` puts fp32 back (the values stay bf16-rounded) and removes the hooks;
`merge`/`unload` call it first, so a merged or exported model is fp32 whatever the training used.
Adapter files hold the trained tensors only (fp32), so they are the same format either way.

8-bit/4-bit frozen weights (QLoRA) are not offered: bitsandbytes' 4-bit kernels are GPU-only and
no CPU-capable quantisation library (torchao, bitsandbytes) is a dependency of this package.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)
_MARK = "_medico_base_dtype"  # set on every module cast here


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `train.base_dtype` value."""
    if name not in BASE_DTYPES:
        raise ConfigError(f"base_dtype: expected one of {', '.join(BASE_DTYPES)}, got {name!r}")
    return BASE_DTYPES[name]


def _autocasting(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def _cast_input(module: nn.Module, args: tuple):
    if not args or not torch.is_tensor(args[0]):
        return None
    x, w = args[0], module.weight
    if not x.is_floating_point() or x.dtype == w.dtype or _autocasting(x):
        return None
    return (x.to(w.dtype), *args[1:])


def _cast_output(module: nn.Module, args: tuple, out):
    if torch.is_tensor(out) and out.dtype == module.weight.dtype and out.dtype != torch.float32 \
            and not _autocasting(out):
        return out.float()
    return None


def _frozen_castable(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return isinstance(module, CAST_TYPES) and bool(own) and not any(p.requires_grad for p in own)


def cast_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16, scope: str = "image_encoder") -> list[str]:
    """Store the frozen Linear/Conv weights under `scope` in `dtype` (in place); returns the module names cast.

    Call it after PEFT injection (what is trainable then stays fp32). float32 is a no-op; casting twice
    does nothing more.
    """
    if dtype == torch.float32:
        return []
    if dtype not in BASE_DTYPES.values():
        raise ConfigError(f"base_dtype: {dtype} is not supported; choose one of {', '.join(BASE_DTYPES)}")
    root = model.get_submodule(scope) if scope else model
    names = []
    for name, module in root.named_modules():
        if getattr(module, _MARK, None) is not None or not _frozen_castable(module):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)  # replaces the storage; the fp32 one is freed
        module.register_forward_pre_hook(_cast_input)
        module.register_forward_hook(_cast_output)
        setattr(module, _MARK, dtype)
        names.append(f"{scope}.{name}" if scope else name)
    return names


def _remove_hooks(module: nn.Module) -> None:
    for hooks, fn in ((module._forward_pre_hooks, _cast_input), (module._forward_hooks, _cast_output)):
        for key in [k for k, f in hooks.items() if f is fn]:
            del hooks[key]


def restore_base_dtype(model: nn.Module) -> int:
    """Undo `cast_frozen_base` (fp32 storage back, hooks removed; the values stay as rounded); returns the count.

    Works on deep copies too (the hooks are found by identity, not by handle).
    """
    count = 0
    for module in model.modules():
        if getattr(module, _MARK, None) is None:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.float()
        _remove_hooks(module)
        delattr(module, _MARK)
        count += 1
    return count


def frozen_base_dtype(model: nn.Module) -> torch.dtype:
    """bf16 when `cast_frozen_base` cast any module of `model`, else float32."""
    for module in model.modules():
        marked = getattr(module, _MARK, None)
        if marked is not None:
            return marked
    return torch.float32


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers per dtype (`"float32"`, `"bfloat16"`, ...), each storage once."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device.index or 0)
        if key in seen:
            continue
        seen.add(key)
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.untyped_storage().nbytes()
    return dict(sorted(out.items()))
