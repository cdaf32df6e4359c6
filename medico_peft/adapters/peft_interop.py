"""Stock HF peft <-> medico_peft: the fused-qkv LoRA layout, foreign peft directories, the stock-peft check.

Our q/k/v-selective LoRA lives on split `attn.qkv.q/.k/.v` Linears (`tuners.qkv_split`) that official
`segment_anything` does not have. It has an exact fused equivalent on the official `attn.qkv`:
with the targeted parts p_1..p_n (n of q, k, v) each of rank r,

    A = [A_p1; ...; A_pn]                      (n*r, in)   stacked
    B[rows(p_i), i*r:(i+1)*r] = B_pi, else 0   (out, n*r)  block-diagonal into the q/k/v output rows

so B @ A puts B_pi @ A_pi exactly on p_i's rows and zero on the others. The scaling stays the same
by giving the fused layer lora_alpha = n * alpha (alpha/r = n*alpha/(n*r)), or alpha * sqrt(n) with
rsLoRA (alpha/sqrt(r) = alpha*sqrt(n)/sqrt(n*r)). `rows(p)` follows the attention's own layout:
q|k|v thirds for the ViT, per-head interleaving for TinyViT (`qkv_split.layout_of`).

DoRA is exact too: peft's fused DoRA scales each output row by m / ||W + s*B@A||_row. On q/v rows the
fused B@A equals the split one, so the magnitudes copy over; on an untargeted (k) row B@A is exactly
zero and we store m_k = torch.linalg.norm(W, dim=1)[k], the very value peft computes at run time, so
m_k / norm is exactly 1 and `(m/norm - 1) * base` adds exactly 0. Nothing needs refusing for DoRA.
(Only training behaviour differs: peft draws one dropout mask for the fused input where the split
layers drew one per part; with dropout 0, or at inference, there is no difference.)

Foreign directories (written by stock peft for official SAM, or one of ours that was trained further
in stock peft) are mapped onto a `PeftConfig` that covers every adapted module; modules the config
injects that the directory does not adapt keep B = 0 (and DoRA magnitude = weight norm), so they add
exactly nothing. Different ranks are zero-padded to the largest rank (exact); a module whose scaling
differs from the chosen one has its B rescaled (exact up to float rounding).
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import torch
from torch import nn

from ..errors import AdapterError, MedicoPeftError
from ..tuners import PeftConfig, encoder_block_names, inject, is_injected, peft_state, trainable_state_dict, unload
from ..tuners.blocks import TARGET_PATHS
from ..tuners.lora.model import DECODER_LORA_REGEX
from ..tuners.merge import default_probe
from ..tuners.qkv_split import SplitQkv, layout_of, row_indices
from .format import file_key
from .io import restore_base_parts, snapshot_base_parts

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
QKV_PATTERN = r"attn\.qkv"  # rank_pattern/alpha_pattern key: peft matches it as a suffix of module names
# peft initialisations that change the base weights: an adapter made with them does not fit the plain base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def split_parts(cfg: PeftConfig) -> list[str]:
    return [p for p in ("q", "k", "v") if p in cfg.targets] if cfg.method in ("lora", "dora") else []


def fused_alpha(cfg: PeftConfig, n: int) -> float:
    """lora_alpha of the fused rank-n*r layer that keeps the split layers' scaling."""
    return cfg.alpha * (math.sqrt(n) if cfg.use_rslora else n)


def _base_weight(layer: nn.Module) -> torch.Tensor:
    return layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight


def dora_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Row norms exactly as peft's DoRA computes them for a Linear (W + s*0 is W)."""
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


# --- export: split -> fused ----------------------------------------------------------------------
def fuse_split_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Replace every split `attn.qkv.{q,k,v}` LoRA/DoRA by its exact fused `attn.qkv` equivalent.

    Returns (tensors under fused module names, names of the fused modules).
    """
    cfg = peft_state(model).config
    parts = split_parts(cfg)
    out = dict(tensors)
    fused = []
    if not parts:
        return out, fused
    r = cfg.rank
    for name, split in model.named_modules():
        if not isinstance(split, SplitQkv) or f"{name}.{parts[0]}.lora_A.weight" not in out:
            continue
        rows = row_indices(split.layout)
        a = torch.cat([out.pop(f"{name}.{p}.lora_A.weight") for p in parts])
        b = a.new_zeros(split.out_features, len(parts) * r)
        for i, p in enumerate(parts):
            b[rows[p], i * r:(i + 1) * r] = out.pop(f"{name}.{p}.lora_B.weight")
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
        if cfg.method == "dora":
            weight = a.new_zeros(split.out_features, split.in_features)
            for p in "qkv":
                weight[rows[p]] = _base_weight(getattr(split, p)).detach().cpu()
            magnitude = dora_row_norm(weight)
            for p in parts:
                magnitude[rows[p]] = out.pop(f"{name}.{p}.lora_magnitude_vector")
            out[f"{name}.lora_magnitude_vector"] = magnitude
        fused.append(name)
    return out, fused


# --- import of our own directories: fused -> split -----------------------------------------------
def unfuse_tensors(base_model: nn.Module, cfg: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict | None:
    """The split tensors `cfg` trains, from a fused directory; None where the fused layer is not
    block-structured (e.g. it was trained further in stock peft), so only a fused qkv LoRA expresses it."""
    parts = split_parts(cfg)
    if not parts:
        return dict(tensors)
    from ..tuners import select_block_names

    r, out = cfg.rank, dict(tensors)
    for block in select_block_names(base_model, cfg.blocks):
        name = f"{block}.attn.qkv"
        a, b = out.pop(f"{name}.lora_A.weight", None), out.pop(f"{name}.lora_B.weight", None)
        fused = base_model.get_submodule(name)
        if a is None or b is None or a.shape != (len(parts) * r, fused.in_features) \
                or b.shape != (fused.out_features, len(parts) * r):
            return None
        rows = row_indices(layout_of(base_model.get_submodule(f"{block}.attn")))
        inside = torch.zeros_like(b, dtype=torch.bool)
        for i, p in enumerate(parts):
            inside[rows[p], i * r:(i + 1) * r] = True
        if b[~inside].any():
            return None
        for i, p in enumerate(parts):
            out[f"{name}.{p}.lora_A.weight"] = a[i * r:(i + 1) * r].clone()
            out[f"{name}.{p}.lora_B.weight"] = b[rows[p], i * r:(i + 1) * r].clone()
        if cfg.method == "dora":
            magnitude = out.pop(f"{name}.lora_magnitude_vector", None)
            if magnitude is None or magnitude.shape != (fused.out_features,):
                return None
            untouched = torch.ones(fused.out_features, dtype=torch.bool)
            for p in parts:
                out[f"{name}.{p}.lora_magnitude_vector"] = magnitude[rows[p]].clone()
                untouched[rows[p]] = False
            norm = dora_row_norm(fused.weight.detach().cpu())
            if not torch.equal(magnitude[untouched], norm[untouched]):
                return None
    return out


# --- foreign directories -------------------------------------------------------------------------
_ENCODER_PATH = re.compile(r"^(?P<block>.+)\.(?P<path>attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2|mlp\.fc1|mlp\.fc2)$")


def _target_of(family: str, path: str) -> str | None:
    for target, paths in TARGET_PATHS[family].items():
        if target not in ("q", "k", "v") and path in paths:
            return target
    return None


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_targets_match(base_model: nn.Module, lora_config, source) -> None:
    """The config's target_modules must name at least one module of this SAM (peft's own matching)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in base_model.named_modules() if n]
    if lora_config.target_modules is not None and not any(check_target_module_exists(lora_config, n) for n in names):
        raise AdapterError(f"{source}: target_modules {lora_config.target_modules!r} match no module of this "
                           f"{base_model.spec.name} (SAM's encoder has attn.qkv, attn.proj and MLP linears, its "
                           "decoder q_proj/k_proj/v_proj/out_proj and lin1/lin2): an adapter for another architecture")


def map_foreign(base_model: nn.Module, config: dict, tensors: dict[str, torch.Tensor],
                source) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """(our PeftConfig, tensors under our file keys) for a peft LoRA/DoRA made for official SAM module names.

    The tensors are a subset of what the config trains; `apply_subset` leaves the rest at their
    injected initialisation (B = 0), which adds nothing.
    """
    from peft.utils.other import get_pattern_key

    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{source}: peft_type {config.get('peft_type')!r}; only LoRA/DoRA adapters (peft_type "
                           "'LORA') map onto medico_peft")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{source}: bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}: trained "
                           "biases of the adapted layers are not expressible; expected bias='none'")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if config.get(key):
            raise AdapterError(f"{source}: {key}={config[key]!r} is not expressible in a medico_peft adapter")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{source}: init_lora_weights={config['init_lora_weights']!r} changes the base weights, "
                           "so the adapter does not fit the plain base; save it with peft's "
                           "path_initial_model_for_weight_conversion (a plain LoRA) and import that")
    family = base_model.spec.family
    blocks = encoder_block_names(base_model)
    rs = bool(config.get("use_rslora"))
    dora = bool(config.get("use_dora"))
    # ranks come from the tensor shapes (stock peft's load in the check enforces rank_pattern); alphas from the config
    alpha_pattern = config.get("alpha_pattern") or {}

    lora: dict[str, dict] = {}
    rest = {}
    for key, value in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES + (".lora_magnitude_vector.weight",) if key.endswith(s)), None)
        if suffix is None:
            rest[key] = value
            continue
        lora.setdefault(key[:-len(suffix)], {})[suffix.split(".")[1]] = value
    targets, block_ids, decoder = set(), set(), False
    scaled = {}
    for name in sorted(lora):
        found = lora[name]
        module = _module(base_model, name)
        if module is None:
            raise AdapterError(f"{source}: LoRA on {name!r}, a module this {base_model.spec.name} does not have: "
                               "the adapter was made for another architecture or size")
        match = _ENCODER_PATH.match(name)
        target = _target_of(family, match["path"]) if match and match["block"] in blocks else None
        if target is None and not re.fullmatch(DECODER_LORA_REGEX, name):
            hint = (" (peft's suffix match of target 'proj' also hits the patch-embedding Conv2d; target "
                    r"'.*blocks\.\d+\.attn\.proj' instead)" if name.endswith("patch_embed.proj") else "")
            raise AdapterError(f"{source}: LoRA on {name!r} ({type(module).__name__}) is not expressible in a "
                               "medico_peft adapter, which adapts encoder attn.qkv/attn.proj/MLP linears and the mask "
                               f"decoder's attention and MLP linears{hint}")
        if "lora_A" not in found or "lora_B" not in found or (dora and "lora_magnitude_vector" not in found):
            raise AdapterError(f"{source}: {name!r} lacks lora_A/lora_B" + (" or lora_magnitude_vector" if dora else ""))
        a, b = found["lora_A"], found["lora_B"]
        r = a.shape[0]
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(f"{source}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this "
                               f"{base_model.spec.name} (expected {want_a} / {want_b}): the adapter was made for "
                               "another architecture or size")
        alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), config.get("lora_alpha", 8)))
        scaled[name] = (r, alpha, alpha / (math.sqrt(r) if rs else r))
        if target is None:
            decoder = True
        else:
            targets.add(target)
            block_ids.add(blocks.index(match["block"]))

    train_decoder = train_prompt = False
    owned = []
    for entry in config.get("modules_to_save") or []:
        matched = [n for n, _ in base_model.named_modules() if n and n.endswith(entry)]
        if not matched:
            raise AdapterError(f"{source}: modules_to_save entry {entry!r} matches no module of this SAM")
        for n in matched:
            part = n.split(".", 1)[0]
            if part == "mask_decoder":
                train_decoder = True
            elif part == "prompt_encoder":
                train_prompt = True
            else:
                raise AdapterError(f"{source}: modules_to_save trains {n!r} fully; medico_peft adapters train only the "
                                   "mask decoder and prompt encoder fully")
            owned.append(n + ".")
    params = {n for n, _ in base_model.named_parameters()}
    base_state = base_model.state_dict()
    for key in [k for k in rest if k in base_state and k not in params]:  # buffers peft saved with modules_to_save
        if not torch.equal(rest[key].to(base_state[key].dtype), base_state[key]):
            raise AdapterError(f"{source}: buffer {key!r} differs from this base's; not expressible (buffers do not train)")
        del rest[key]
    strays = [k for k in rest if not k.startswith(tuple(owned))]
    if strays:
        raise AdapterError(f"{source}: tensor {strays[0]!r} is neither a LoRA tensor nor under modules_to_save")
    if decoder and train_decoder:
        raise AdapterError(f"{source}: LoRA on the mask decoder together with a fully trained decoder part "
                           "(modules_to_save) is not expressible (decoder_lora trains only the decoder's LoRA)")
    if not lora and not rest:
        raise AdapterError(f"{source}: no LoRA tensors and nothing under modules_to_save")

    if scaled:
        top = max(scaled.values(), key=lambda v: v[0])
        rank, alpha, scaling = top
    else:
        rank, alpha, scaling = 8, 8.0, 1.0
    if targets:
        method = "dora" if dora else "lora"
        order = [t for t in ("qkv", "proj", "mlp") if t in targets]
        chosen_blocks = "all" if len(block_ids) == len(blocks) else sorted(block_ids)
    else:
        if dora and decoder:
            raise AdapterError(f"{source}: DoRA on the mask decoder alone is not expressible (medico_peft's DoRA "
                               "is an encoder method; decoder_lora is plain LoRA)")
        method, order, chosen_blocks = "decoder_only", ["q", "v"], "all"
    cfg = PeftConfig(method=method, rank=rank, alpha=alpha, use_rslora=rs, dropout=float(config.get("lora_dropout", 0.0)),
                     targets=order, blocks=chosen_blocks, train_decoder=train_decoder,
                     train_prompt_encoder=train_prompt, decoder_lora=decoder)
    mapped = dict(rest)
    for name, found in lora.items():
        r, _, s = scaled[name]
        a, b = found["lora_A"], found["lora_B"]
        if s != scaling:
            b = b * (s / scaling)
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        mapped[f"{name}.lora_A.weight"], mapped[f"{name}.lora_B.weight"] = a, b
        if dora:
            mapped[f"{name}.lora_magnitude_vector"] = found["lora_magnitude_vector"]
    return cfg, mapped


def apply_subset(model: nn.Module, cfg: PeftConfig, tensors: dict[str, torch.Tensor], source) -> None:
    """Inject `cfg` and copy `tensors` (a subset of its trained tensors; the rest keep their initialisation).

    On any failure the model is left as it was.
    """
    saved = snapshot_base_parts(model)
    try:
        inject(model, cfg)
        params = {file_key(n): p for n, p in trainable_state_dict(model).items()}
        for key, value in tensors.items():
            if key not in params or params[key].shape != value.shape:
                raise AdapterError(f"{source}: {key} {tuple(value.shape)} has no place in the mapped config "
                                   f"(model has {tuple(params[key].shape) if key in params else 'no such tensor'})")
        with torch.no_grad():
            for key, value in tensors.items():
                params[key].copy_(value.to(params[key].dtype))
    except MedicoPeftError:
        if is_injected(model):
            unload(model)
        restore_base_parts(model, saved)
        raise


# --- the stock-peft check ------------------------------------------------------------------------
@torch.no_grad()
def probe_outputs(model: nn.Module, probe=None) -> list[torch.Tensor]:
    """Image embeddings, low-res logits of all four mask tokens and IoU predictions on a seeded probe."""
    images, boxes = probe if probe is not None else default_probe(model.img_size)
    model.eval()
    emb = model.encode(images)
    sparse, dense = model.embed_prompts(boxes=boxes)
    low, iou = model.decode_all_tokens(emb, sparse, dense)
    return [emb, low, iou]


def load_with_stock_peft(plain_model: nn.Module, directory) -> nn.Module:
    """`peft.PeftModel.from_pretrained(plain_model, directory)`'s inner model (plain_model is changed)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about models without a HF config
        wrapped = PeftModel.from_pretrained(plain_model, str(directory))
    return wrapped.base_model.model


def check_against_stock_peft(model: nn.Module, plain_copy: nn.Module, directory, tolerance: float) -> float:
    """Max |difference| between `model` and stock peft's reading of `directory` onto `plain_copy`;
    AdapterError above `tolerance` or when stock peft cannot load it."""
    try:
        reference = load_with_stock_peft(plain_copy, directory)
    except Exception as exc:  # peft raises many types (size mismatch, bad config, missing keys)
        detail = " ".join(str(exc).split())[:300]
        raise AdapterError(f"{directory}: stock peft cannot load this directory onto the {model.spec.name} base "
                           f"({type(exc).__name__}: {detail})") from None
    diff = max((x - y).abs().max().item() for x, y in zip(probe_outputs(model), probe_outputs(reference)))
    if not diff <= tolerance:
        raise AdapterError(f"{directory}: medico_peft's model and stock peft's reading of the directory differ by "
                           f"{diff:.3g} > tolerance {tolerance:g} on a probe image")
    return diff


def plain_copy_of(model: nn.Module) -> nn.Module:
    """A plain copy of an injected model (its trained decoder parts included)."""
    plain = copy.deepcopy(model)
    if is_injected(plain):
        unload(plain)
    return plain
