"""LoRA initialisations beyond peft's default: PiSSA and OLoRA (they change the base), EVA (data-driven).

PiSSA / OLoRA (peft `init_lora_weights="pissa"` / `"olora"`): peft sets A0, B0 from the SVD / QR of each
adapted base weight W and replaces W by the residual W_res = W - s·B0·A0 (s = alpha/r, or alpha/sqrt(r)
with rsLoRA), so the freshly injected model still computes W. After training it computes W_res + s·B·A,
which only means something together with W_res. Adapter files are tied to the ORIGINAL base by sha256,
so an adapter is converted at save time (`converted_state`, as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does) into a plain LoRA on W:

    W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0]

a rank-2r LoRA with the same scale s (alpha doubled; times sqrt(2) with rsLoRA) and the default init.
DoRA: the converted weight W + s·(B·A - B0·A0) is the same matrix as W_res + s·B·A, so the same magnitude
vector gives the same layer. The converted file loads, exports (peft format), merges and switches exactly
like any LoRA file. `inject` keeps bit-exact copies of the original weights (`InitRecord`), so `unload`
gives back the base it was injected into; `merge` folds B·A into the residual (= the trained weights).

EVA (peft `init_lora_weights="eva"`, arXiv 2410.07170): B = 0 (the model starts at the base) and the rows
of A are the top-r principal directions of each layer's inputs on a few training batches
(`eva_initialise`; the trainer feeds `peft.eva_batches` batches). Unlike peft's `initialize_lora_eva_weights`
this does no rank redistribution (peft's rho = 1: every layer keeps rank r, so one rank describes the
adapter file) and no whitening; the principal directions are computed exactly (covariance of all tokens of
all batches, float64, `torch.linalg.eigh`) instead of peft's incremental low-rank PCA with its convergence
loop, so the number of batches is bounded by the config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ...errors import ConfigError

MUTATING = ("pissa", "olora")  # inits that rewrite the base weight
PEFT_INIT = {"default": True, "pissa": "pissa", "olora": "olora", "eva": "eva"}  # ours -> peft init_lora_weights


@dataclass
class InitRecord:
    """What a base-mutating init changed: original base weights (CPU copies) and the initial A0, B0."""

    kind: str
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> original `weight`
    a0: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> initial lora_A weight (r, in)
    b0: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> initial lora_B weight (out, r)


@dataclass
class EvaRecord:
    """EVA: whether A has been computed from data yet, and from how many batches / tokens."""

    done: bool = False
    batches: int = 0
    tokens: int = 0


def check_rank_fits(model: nn.Module, names: list[str], rank: int, init: str) -> None:
    """PiSSA/OLoRA take r singular vectors / QR columns of each weight: r must not exceed min(out, in)."""
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        if rank > min(out_f, in_f):
            raise ConfigError(f"rank: init {init!r} takes {rank} singular directions of {name} "
                              f"({out_f}×{in_f}), which has at most {min(out_f, in_f)}; use rank <= "
                              f"{min(out_f, in_f)} or init default/eva")


def snapshot_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().cpu().clone() for name in names}


def record_initial(model: nn.Module, names: list[str], adapter_name: str, kind: str,
                   original: dict[str, torch.Tensor]) -> InitRecord:
    """After peft's init: the initial A0, B0 of every adapted layer (CPU copies) and the original weights."""
    rec = InitRecord(kind=kind, original=original)
    for name in names:
        layer = model.get_submodule(name)
        rec.a0[name] = layer.lora_A[adapter_name].weight.detach().cpu().clone()
        rec.b0[name] = layer.lora_B[adapter_name].weight.detach().cpu().clone()
    return rec


def restore_original_weights(model: nn.Module, rec: InitRecord) -> None:
    """Put the original base weights back (after the LoRA layers were replaced by their base layers)."""
    with torch.no_grad():
        for name, weight in rec.original.items():
            target = model.get_submodule(name).weight
            target.copy_(weight.to(target.device, target.dtype))


def needs_conversion(model: nn.Module) -> bool:
    """True for a model injected with PiSSA/OLoRA (its base holds the residual, not the original weights)."""
    from ..state import is_injected, peft_state

    return is_injected(model) and isinstance(peft_state(model).lora_init, InitRecord)


def converted_config(cfg):
    """The plain-LoRA config of a converted PiSSA/OLoRA adapter: rank 2r, the same scale, default init."""
    alpha = cfg.alpha * (math.sqrt(2.0) if cfg.use_rslora else 2.0)
    return dataclasses.replace(cfg, rank=2 * cfg.rank, alpha=alpha, init="default")


def converted_state(model: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """(plain-LoRA PeftConfig, every trained tensor under its parameter name) for a PiSSA/OLoRA model.

    Each adapted layer's (A, B) becomes ([A ; A0], [B | -B0]) (see the module docstring): applied to the
    ORIGINAL base with the converted config, it computes what the trained model computes on its residual.
    Other trained tensors (decoder, DoRA magnitudes) are copied unchanged.
    """
    from ..report import trainable_state_dict
    from ..state import peft_state

    state = peft_state(model)
    rec = state.lora_init
    if not isinstance(rec, InitRecord):
        raise ConfigError(f"init: the model's LoRA init is {state.config.init!r}; only pissa/olora adapters "
                          "need converting")
    ad = state.adapter_name
    out = {n: p.detach().cpu().clone() for n, p in trainable_state_dict(model).items()}
    for name in rec.a0:
        ka, kb = f"{name}.lora_A.{ad}.weight", f"{name}.lora_B.{ad}.weight"
        out[ka] = torch.cat([out[ka], rec.a0[name].to(out[ka].dtype)], dim=0)
        out[kb] = torch.cat([out[kb], -rec.b0[name].to(out[kb].dtype)], dim=1)
    return converted_config(state.config), out


def to_plain_lora(model: nn.Module) -> nn.Module:
    """Convert a PiSSA/OLoRA model in place into the plain rank-2r LoRA on its original base weights.

    Outputs stay the same (up to float rounding); `model.base_sha256` (the original base's hash, taken
    at injection) is kept. Afterwards the model is what `load_adapter` of its saved file gives.
    """
    from ..inject import inject
    from ..merge import unload
    from ..report import trainable_state_dict
    from ..state import peft_state

    cfg, tensors = converted_state(model)
    adapter_name = peft_state(model).adapter_name
    sha, source = getattr(model, "base_sha256", None), getattr(model, "base_source", None)
    device = next(model.parameters()).device
    unload(model)  # restores the original weights; a decoder trained in place keeps its trained weights
    inject(model, cfg, adapter_name=adapter_name)
    model.to(device)
    if sha is not None:
        model.base_sha256, model.base_source = sha, source
    params = trainable_state_dict(model)
    if sorted(params) != sorted(tensors):
        raise ConfigError("init: the converted adapter's tensors do not match the plain LoRA layout "
                          f"({sorted(set(params) ^ set(tensors))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    return model


# --- EVA ------------------------------------------------------------------------------------------
class _Moments:
    """Running token count, sum and x^T x (float64) of one layer input."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.xtx = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.xtx = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.xtx += x.T @ x

    def components(self, r: int) -> torch.Tensor:
        """(r, in) top-r principal directions of the centred inputs, sign fixed (largest |entry| positive)."""
        mean = self.sum / self.n
        cov = (self.xtx - self.n * torch.outer(mean, mean)) / max(1, self.n - 1)
        values, vectors = torch.linalg.eigh(cov)
        top = vectors[:, values.argsort(descending=True)[:r]].T.contiguous()
        signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
        return top * torch.where(signs == 0, torch.ones_like(signs), signs)


@torch.no_grad()
def eva_initialise(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> EvaRecord:
    """Set every encoder LoRA layer's A to the top-r principal directions of its inputs on `batches`.

    `batches` yields (images (B, 3, S, S) in [0, 1], input_size (B, 2) or None), encoded with
    `model.encode` (the padding handled as in training). B stays 0, so the model still equals its base.
    Layers that receive the same input tensor (q, k, v of one split qkv) share one computation.
    """
    from ..state import peft_state
    from .layer import lora_layer_names

    state = peft_state(model)
    cfg, ad = state.config, state.adapter_name
    if cfg.init != "eva":
        raise ConfigError(f"init: eva_initialise needs init 'eva', the model was injected with {cfg.init!r}")
    names = lora_layer_names(model)
    outside = [n for n in names if not n.startswith("image_encoder.")]
    if outside:
        raise ConfigError(f"init: eva initialises image-encoder LoRA layers only; {outside[0]} is not one")
    moments: dict[str, _Moments] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose (identical) input it shares
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id of an input tensor -> (first layer, the tensor, kept
    # alive for the forward so that no later input can reuse its id or memory)

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            first, _ = seen.setdefault(id(x), (name, x))
            if first != name:
                alias[name] = first
                return
            moments.setdefault(name, _Moments()).add(x)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for images, input_size in batches:
            seen.clear()
            model.encode(images, input_size)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ConfigError("peft.eva_batches: eva got no training batch to compute layer inputs from "
                          "(the training set is empty)")
    tokens = 0
    for name in names:
        layer = model.get_submodule(name)
        stats = moments[alias.get(name, name)]
        r = layer.r[ad]
        if stats.n <= r:
            raise ConfigError(f"peft.eva_batches: {name} saw {stats.n} input tokens, fewer than rank+1 = {r + 1}; "
                              "use more batches")
        weight = layer.lora_A[ad].weight
        weight.copy_(stats.components(r).to(weight.device, weight.dtype))
        tokens = max(tokens, stats.n)
    record = EvaRecord(done=True, batches=n_batches, tokens=tokens)
    state.lora_init = record
    return record


def needs_eva(model: nn.Module) -> bool:
    """True for a model injected with init eva whose A has not been computed from data yet."""
    from ..state import is_injected, peft_state

    if not is_injected(model):
        return False
    state = peft_state(model)
    return state.config.init == "eva" and not (isinstance(state.lora_init, EvaRecord) and state.lora_init.done)
