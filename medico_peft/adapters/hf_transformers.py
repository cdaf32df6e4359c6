"""Adapters for HF transformers' `SamModel`: stock-peft directories that `PeftModel.from_pretrained(SamModel(config),
DIR)` loads (`export_peft_hf_dir`), and LoRA/DoRA directories trained by stock peft on a `SamModel` brought onto a
`MedSam` as one of our adapter files (`import_peft_hf_dir`).

Names come from `models.hf_sam` (official <-> SamModel key map). Our q/k/v-selective LoRA lives on split
`qkv.q/.k/.v` Linears; SamModel (like official SAM) has one fused `qkv`. A q LoRA (A_q, B_q) and a v LoRA
(A_v, B_v) of rank r with scale s are exactly one fused LoRA of rank 2r:

    A = [A_q; A_v]   (2r x d),   B = [[B_q, 0], [0, 0], [0, B_v]]   (3d x 2r, rows q | k | v),

since B A = [B_q A_q; 0; B_v A_v]; its alpha is chosen so that peft's scale (alpha/r, or alpha/sqrt(r) with
rsLoRA) stays s, and it is written per module as peft's `rank_pattern` / `alpha_pattern`. DoRA is exact too:
peft's DoRA scales each output row by magnitude / ||W + sBA||_row, so the fused magnitude is [m_q; ||W_k||_row; m_v]
(rows without LoRA keep their base norm and are left unchanged). Trained SAM parts travel as peft's
`modules_to_save` under SamModel names.

Import accepts LoRA/DoRA on `vision_encoder.layers.N.attn.qkv`, `.attn.proj`, `.mlp.lin1/lin2` and on the mask
decoder transformer's attention projections and MLP linears, plus `modules_to_save` `mask_decoder` and
`prompt_encoder`. Differing ranks/alphas per module and partial coverage become one `PeftConfig` (largest rank,
union of blocks and targets): A is zero-padded, B padded and multiplied by s_module / s_ours, and modules the
foreign adapter left alone get B = 0 (DoRA: their base row norms) — exact for inference (the padded directions
stay zero if training continues). The result is checked on a probe image against the base with each foreign
update folded in directly from the foreign tensors (no peft layers involved).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MedicoPeftError
from ..models.hf_sam import NO_TINYVIT, hf_key_map, official_module_names
from ..tuners import PeftConfig, inject, is_injected, peft_state, trainable_state_dict, unload
from ..tuners.lora.model import DECODER_LORA_REGEX
from .format import file_key
from .hf_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_peft_folder
from .io import adapter_tensors, apply_tensors, restore_base_parts, snapshot_base_parts

SOURCE_FORMAT = "peft-hf"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_ENC_TARGET = re.compile(r"^image_encoder\.blocks\.(?P<block>\d+)\.(?P<path>attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)$")
_TARGET_OF_PATH = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.lin1": "mlp", "mlp.lin2": "mlp"}
# peft's modules_to_save names on a SamModel -> our PeftConfig flag
_SAVED_PARTS = {"mask_decoder": "train_decoder", "prompt_encoder": "train_prompt_encoder"}
# markers of SamModel naming (official SAM and MedSam never use them)
HF_MARKERS = ("vision_encoder.", "shared_image_embedding.", "mask_decoder.upscale_", ".proj_in.", ".proj_out.",
              "prompt_encoder.mask_embed.", "prompt_encoder.point_embed.", ".layer_norm")


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _require_vit(model: nn.Module, what: str) -> None:
    if model.spec.family != "vit":
        raise AdapterError(f"{what}: the model is {model.spec.name}; {NO_TINYVIT}")


# --- export ----------------------------------------------------------------------------------------
def _lora_groups(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({module: {"A", "B", "m"}}, other tensors) from our adapter-file keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            rest[key] = value
            continue
        kind = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(m["kind"], "m")
        groups.setdefault(m["module"], {})[kind] = value
    return groups, rest


def _fused_lora(model: nn.Module, qkv: str, parts: dict[str, dict[str, torch.Tensor]], dora: bool) -> dict:
    """One fused-qkv LoRA (A, B[, magnitude]) equal to LoRAs on some of `qkv.q/.k/.v` (see module docstring)."""
    split = model.get_submodule(qkv)
    order = [p for p in ("q", "k", "v") if p in parts]
    sizes = {p: getattr(split, p).out_features for p in ("q", "k", "v")}
    offsets = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}
    ranks = {p: parts[p]["A"].shape[0] for p in order}
    A = torch.cat([parts[p]["A"] for p in order], dim=0)
    B = torch.zeros(sum(sizes.values()), A.shape[0], dtype=A.dtype)
    col = 0
    for p in order:
        B[offsets[p]:offsets[p] + sizes[p], col:col + ranks[p]] = parts[p]["B"]
        col += ranks[p]
    out = {"A": A, "B": B}
    if dora:
        mags = []
        for p in ("q", "k", "v"):
            if p in parts:
                mags.append(parts[p]["m"])
            else:  # no LoRA on these rows: peft's DoRA leaves them unchanged iff magnitude = base row norm
                layer = getattr(split, p)
                weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
                mags.append(torch.linalg.norm(weight.detach().float(), dim=1).to(A.dtype))
        out["m"] = torch.cat(mags)
    return out


def export_peft_hf_dir(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's LoRA/DoRA adapter as a stock peft directory for `transformers.SamModel`.

    `PeftModel.from_pretrained(SamModel(config), directory)` loads it when the SamModel holds the same base
    weights (`medico-peft convert-hf to-hf` writes that base). `directory` is written whole or not at all.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if not is_injected(model):
        raise AdapterError("export_peft_hf_dir: the model has no PEFT config; inject or load an adapter first")
    _require_vit(model, "export --format peft-hf")
    state = peft_state(model)
    cfg: PeftConfig = state.config
    if cfg.method == "adapter" or not cfg.uses_lora:
        raise AdapterError(f"export --format peft-hf: method {cfg.method!r} cannot be written for stock peft: peft has "
                           "no bottleneck adapters, and a peft directory needs LoRA/DoRA modules (lora, dora, or "
                           "decoder_lora)")
    dora = state.lora_config.use_dora
    scale = _scale(cfg.alpha, cfg.rank, cfg.use_rslora)
    groups, rest = _lora_groups(adapter_tensors(model))
    base_keys = _plain_keys(model)
    fused: dict[str, dict[str, torch.Tensor]] = {}
    split_parts: dict[str, dict[str, dict]] = {}
    for module, tensors in groups.items():
        parent, _, leaf = module.rpartition(".")
        if parent.endswith(".attn.qkv") and leaf in ("q", "k", "v"):
            split_parts.setdefault(parent, {})[leaf] = tensors
        else:
            fused[module] = tensors
    for qkv, parts in split_parts.items():
        fused[qkv] = _fused_lora(model, qkv, parts, dora)
    keymap = hf_key_map(base_keys)
    hf_name = {m: keymap[m + ".weight"][: -len(".weight")] for m in fused}
    out: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for module, t in sorted(fused.items()):
        name = hf_name[module]
        out[f"{PREFIX}{name}.lora_A.weight"] = t["A"].contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = t["B"].contiguous()
        if dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = t["m"].contiguous()
        r = t["A"].shape[0]
        if r != cfg.rank:
            rank_pattern[name] = r
            alpha_pattern[name] = scale * (math.sqrt(r) if cfg.use_rslora else r)
    modules_to_save = []
    if cfg.train_decoder and not cfg.decoder_lora:
        modules_to_save.append("mask_decoder")
    if cfg.train_prompt_encoder:
        modules_to_save.append("prompt_encoder")
    plain_state = None
    for part in modules_to_save:  # every tensor of the wrapped part, trained or not (peft saves the whole copy)
        plain_state = plain_state or _plain_state(model)
        for key, value in plain_state.items():
            if key.startswith(part + "."):
                hf = keymap[key]
                if hf == "shared_image_embedding.positional_embedding":
                    hf = "prompt_encoder.shared_embedding.positional_embedding"  # its name inside SamModel.prompt_encoder
                out[PREFIX + hf] = rest.get(key, value).detach().cpu().contiguous()
    leftover = [k for k in rest if not k.startswith(tuple(p + "." for p in modules_to_save))]
    if leftover:
        raise AdapterError(f"export --format peft-hf: trained tensor {leftover[0]!r} has no place in the peft directory")
    regex = "^(?:" + "|".join(re.escape(hf_name[m]) for m in sorted(fused)) + ")$"
    config = _lora_config(cfg, regex, dora, rank_pattern, alpha_pattern, modules_to_save)
    metadata = {"format": "pt", "medico_peft.source": "export_peft_hf_dir",
                "medico_peft.config": json.dumps(cfg.to_dict(), sort_keys=True),
                "medico_peft.base_spec": json.dumps(model.spec.to_dict(), sort_keys=True),
                "medico_peft.base_sha256": str(model.base_sha256)}
    from ..utils.paths import staged_folder

    with staged_folder(directory) as stage:
        save_file(out, str(stage / WEIGHTS_NAME), metadata=metadata)
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _lora_config(cfg: PeftConfig, regex: str, dora: bool, rank_pattern: dict, alpha_pattern: dict,
                 modules_to_save: list) -> dict:
    from peft import LoraConfig

    lc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                    use_dora=dora, target_modules=regex, bias="none", rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern, modules_to_save=modules_to_save or None, inference_mode=True)
    data = lc.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, (set, frozenset)):
            data[key] = sorted(value)
        elif hasattr(value, "value") and not isinstance(value, (int, float, str)):  # enums (peft_type, task_type)
            data[key] = value.value
    return json.loads(json.dumps(data, default=str))


def _plain_keys(model: nn.Module) -> list[str]:
    """The base model's official state-dict keys (peft wrappers and split qkv removed)."""
    return list(_plain_state(model))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Official-key state dict of the base weights of an injected model (LoRA-free, qkv fused)."""
    from ..tuners.qkv_split import SplitQkv

    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if any(p in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
                     "lora_dropout") for p in parts) or "adapter" in parts:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = value
    for name, module in model.named_modules():  # split qkv -> fused rows, in the layout SplitQkv.fuse uses
        if isinstance(module, SplitQkv):
            for leaf in ("weight", "bias"):
                rows = [state.pop(f"{name}.{p}.{leaf}", None) for p in ("q", "k", "v")]
                if all(r is not None for r in rows):
                    state[f"{name}.{leaf}"] = torch.cat(rows)
    return state


# --- import ----------------------------------------------------------------------------------------
def looks_like_hf_sam_peft(keys) -> bool:
    """True when peft adapter keys use SamModel names (`vision_encoder.`, `proj_in`, ...), not official SAM's."""
    keys = list(keys)
    return any(any(m in k for m in HF_MARKERS) for k in keys) and not any(
        k.startswith(PREFIX + "image_encoder.") for k in keys)


def read_peft_dir(directory: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(adapter_config, safetensors metadata, tensors as stored) of a peft directory; AdapterError naming the file."""
    return read_peft_folder(directory)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_peft_config(config: dict, path) -> None:
    ptype = config.get("peft_type")
    if ptype != "LORA":
        raise AdapterError(f"{path}: peft_type is {ptype!r}; only LoRA/DoRA (peft_type 'LORA') maps onto SAM here")
    for key, ok in (("bias", ("none", None)), ("fan_in_fan_out", (False, None)), ("lora_bias", (False, None)),
                    ("target_parameters", (None, [], {})), ("layer_replication", (None,)),
                    ("trainable_token_indices", (None,))):
        if config.get(key) not in ok:
            raise AdapterError(f"{path}: {key}={config.get(key)!r} is not supported (expected {ok[0]!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")


def plan_hf_import(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], directory) -> tuple:
    """(our PeftConfig, {official module: (A, B, magnitude|None, foreign scale)}, {official key: tensor}) for a
    stock-peft SamModel directory; AdapterError for anything that does not fit this model."""
    path = Path(directory) / WEIGHTS_NAME
    _check_peft_config(config, Path(directory) / CONFIG_NAME)
    _require_vit(model, f"{directory}")
    dora = bool(config.get("use_dora"))
    rslora = bool(config.get("use_rslora"))
    base = model.state_dict()
    hf_to_official = official_module_names(base)
    keymap = hf_key_map(base)
    hf_to_key = {hf: off for off, hf in keymap.items()}
    hf_to_key["prompt_encoder.shared_embedding.positional_embedding"] = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    saved_parts = list(config.get("modules_to_save") or [])
    for part in saved_parts:
        if part not in _SAVED_PARTS:
            raise AdapterError(f"{Path(directory) / CONFIG_NAME}: modules_to_save {part!r} is not supported "
                               f"(medico_peft trains {', '.join(_SAVED_PARTS)} as whole parts)")
    lora: dict[str, dict] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{path}: key {key!r} does not start with {PREFIX!r} (not a peft adapter file)")
        name = key[len(PREFIX):]
        m = _LORA_KEY.match(name)
        if m is not None:
            hf_module = m["module"]
            module = hf_to_official.get(hf_module)
            if module is None:
                raise AdapterError(f"{path}: LoRA module {hf_module!r} does not exist in {model.spec.name} "
                                   f"({_size_hint(model)}); the adapter was made for another architecture or size")
            kind = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(m["kind"], "m")
            lora.setdefault(module, {"hf": hf_module})[kind] = value
            continue
        part = name.split(".", 1)[0]
        if part in saved_parts and name in hf_to_key:
            saved[hf_to_key[name]] = value
            continue
        raise AdapterError(f"{path}: key {key!r} is neither a LoRA tensor nor part of modules_to_save "
                           f"{saved_parts} of a {model.spec.name} SamModel")
    if not lora:
        raise AdapterError(f"{path}: no LoRA tensors (lora_A/lora_B) found")
    plan = {}
    blocks, targets, decoder = set(), [], False
    dec_pattern = re.compile(DECODER_LORA_REGEX)
    ranks, alphas = set(), set()
    for module, t in sorted(lora.items()):
        if "A" not in t or "B" not in t or (dora and "m" not in t):
            missing = [k for k in ("A", "B") + (("m",) if dora else ()) if k not in t]
            raise AdapterError(f"{path}: module {t['hf']!r} lacks its {', '.join(missing)} tensor(s)")
        if "m" in t and not dora:
            raise AdapterError(f"{path}: module {t['hf']!r} has a DoRA magnitude but the config has use_dora false")
        enc = _ENC_TARGET.match(module)
        if enc is not None:
            blocks.add(int(enc["block"]))
            target = _TARGET_OF_PATH[enc["path"]]
            if target not in targets:
                targets.append(target)
        elif dec_pattern.fullmatch(module):
            decoder = True
        else:
            raise AdapterError(f"{path}: LoRA on {t['hf']!r} cannot be placed: medico_peft adapts the encoder's "
                               "attn.qkv, attn.proj, mlp.lin1/lin2 and the mask decoder transformer's linears")
        weight = base[module + ".weight"]
        A, B = t["A"], t["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != weight.shape[1] or B.shape[0] != weight.shape[0] \
                or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{path}: LoRA on {t['hf']!r} has A {tuple(A.shape)}, B {tuple(B.shape)}, but the "
                               f"{model.spec.name} layer is {weight.shape[1]} -> {weight.shape[0]} "
                               f"({_size_hint(model)}); the adapter was made for another size")
        r = A.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), t["hf"], config["lora_alpha"]))
        rank_cfg = int(_pattern_value(config.get("rank_pattern"), t["hf"], config["r"]))
        if rank_cfg != r:
            raise AdapterError(f"{path}: module {t['hf']!r} has rank {r} in its tensors but {rank_cfg} in the config")
        ranks.add(r)
        alphas.add(alpha)
        plan[module] = (A, B, t.get("m"), _scale(alpha, r, rslora))
    if "train_decoder" in [_SAVED_PARTS[p] for p in saved_parts] and decoder:
        raise AdapterError(f"{directory}: LoRA on the mask decoder together with modules_to_save 'mask_decoder' "
                           "cannot be expressed (medico_peft either trains the decoder or puts LoRA on it)")
    rank = max(ranks)
    alpha = alphas.pop() if len(ranks) == 1 and len(alphas) == 1 else float(rank)
    method = ("dora" if dora else "lora") if targets else "decoder_only"
    if method == "decoder_only" and dora:
        raise AdapterError(f"{directory}: DoRA on the mask decoder alone cannot be expressed by medico_peft's config "
                           "(decoder_lora uses plain LoRA unless the encoder has DoRA too)")
    order = [t for t in ("qkv", "proj", "mlp") if t in targets]
    try:
        cfg = PeftConfig(method=method, rank=rank, alpha=alpha, use_rslora=rslora,
                         targets=order or ("q", "v"), blocks=sorted(blocks) if blocks else "all",
                         decoder_lora=decoder, train_decoder="mask_decoder" in saved_parts,
                         train_prompt_encoder="prompt_encoder" in saved_parts,
                         dropout=float(config.get("lora_dropout") or 0.0))
    except ConfigError as exc:
        raise AdapterError(f"{directory}: cannot be expressed as a medico_peft config: {exc}") from None
    gauss = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    if gauss in saved and not torch.equal(saved[gauss].to(base[gauss].dtype), base[gauss]):
        raise AdapterError(f"{path}: prompt_encoder.shared_embedding.positional_embedding differs from the base's; "
                           "segment_anything keeps this random Fourier matrix fixed (a buffer), so a trained one "
                           "cannot be carried over")
    for part in saved_parts:
        expected = {k for k in base if k.startswith(part + ".")}
        missing = sorted(expected - set(saved))
        if missing:
            raise AdapterError(f"{path}: modules_to_save {part!r} lacks {len(missing)} tensors (first: "
                               f"{keymap[missing[0]]!r})")
        for key in expected:
            if tuple(saved[key].shape) != tuple(base[key].shape):
                raise AdapterError(f"{path}: {keymap[key]!r} has shape {tuple(saved[key].shape)}, the {model.spec.name} "
                                   f"parameter is {tuple(base[key].shape)}; the adapter was made for another size")
    return cfg, plan, saved


def _size_hint(model: nn.Module) -> str:
    e = model.spec.encoder
    return f"{model.spec.name}: hidden {e['embed_dim']}, {e['depth']} layers"


def _our_tensors(model: nn.Module, cfg: PeftConfig, plan: dict, saved: dict) -> dict[str, torch.Tensor]:
    """The file tensors of the injected model that reproduce `plan` (padding as in the module docstring)."""
    ours = _scale(cfg.alpha, cfg.rank, cfg.use_rslora)
    out = {}
    for name, param in trainable_state_dict(model).items():
        key = file_key(name)
        m = _LORA_KEY.match(key)
        if m is None:
            out[key] = saved[key].to(param.dtype) if key in saved else param.detach().clone()
            continue
        module, kind = m["module"], m["kind"]
        entry = plan.get(module)
        if kind.startswith("lora_magnitude_vector"):
            out[key] = entry[2].to(param.dtype) if entry is not None else param.detach().clone()
            continue
        value = torch.zeros_like(param)
        if entry is not None:
            A, B, _, foreign = entry
            r = A.shape[0]
            if kind == "lora_A.weight":
                value[:r] = A
            else:
                value[:, :r] = B if foreign == ours else B * (foreign / ours)
        out[key] = value
    return out


def _reference_model(model: nn.Module, plan: dict, saved: dict) -> nn.Module:
    """A copy of the plain base with each foreign update folded in straight from the foreign tensors."""
    ref = copy.deepcopy(model)
    state = ref.state_dict()
    with torch.no_grad():
        for key, value in saved.items():
            state[key].copy_(value)
        for module, (A, B, mag, s) in plan.items():
            w = state[module + ".weight"]
            new = w.double() + s * (B.double() @ A.double())
            if mag is not None:
                new = (mag.double() / torch.linalg.norm(new, dim=1)).unsqueeze(1) * new
            w.copy_(new.to(w.dtype))
    return ref


def probe_difference(model: nn.Module, reference: nn.Module, seed: int = 0) -> float:
    """Max |low-res logits| and |iou| difference of two models on one seeded random image, a box and a point."""
    g = torch.Generator().manual_seed(seed)
    s = model.img_size
    image = torch.rand(1, 3, s, s, generator=g)
    box = torch.tensor([[0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]])
    pts, lab = torch.tensor([[[0.45 * s, 0.5 * s]]]), torch.tensor([[1]])
    worst = 0.0
    with torch.no_grad():
        for kwargs in ({"boxes": box}, {"points": pts, "point_labels": lab}):
            a, ia = model(image, multimask=True, **kwargs)
            b, ib = reference(image, multimask=True, **kwargs)
            worst = max(worst, (a - b).abs().max().item(), (ia - ib).abs().max().item())
    return worst


def import_peft_hf_dir(base_model: nn.Module, directory: str | os.PathLike, verify: bool = True,
                       tolerance: float = 1e-4) -> tuple[nn.Module, float | None]:
    """Put a LoRA/DoRA trained by stock peft on `transformers.SamModel` onto a plain `MedSam` (in place).

    Returns (model, probe difference or None without `verify`). Above `tolerance` the model is restored and
    AdapterError raised. The adapter carries no base hash: the caller chooses the base it was trained on.
    """
    directory = Path(directory)
    if is_injected(base_model):
        raise AdapterError(f"{directory}: the model already has an adapter; import onto a plain base model")
    config, _, tensors = read_peft_dir(directory)
    if not looks_like_hf_sam_peft(tensors) and any(k.startswith(PREFIX + "image_encoder.") for k in tensors):
        raise AdapterError(f"{directory}: module names are official segment_anything's (image_encoder.*), "
                           "not transformers.SamModel's (vision_encoder.*); import it with --format peft")
    _require_vit(base_model, str(directory))
    cfg, plan, saved = plan_hf_import(base_model, config, tensors, directory)
    reference = _reference_model(base_model, plan, saved) if verify else None
    snapshot = snapshot_base_parts(base_model)
    try:
        inject(base_model, cfg)
        apply_tensors(base_model, _our_tensors(base_model, cfg, plan, saved), directory / WEIGHTS_NAME)
    except MedicoPeftError:
        if is_injected(base_model):
            unload(base_model)
        restore_base_parts(base_model, snapshot)
        raise
    diff = None
    if verify:
        base_model.eval()
        diff = probe_difference(base_model, reference)
        if not diff <= tolerance:
            unload(base_model)
            restore_base_parts(base_model, snapshot)
            raise AdapterError(f"{directory}: after mapping onto {base_model.spec.name}, outputs differ from the "
                               f"foreign adapter folded into the base by {diff:.3g} (> tolerance {tolerance:g})")
    base_model.adapter_metadata = {"source_format": SOURCE_FORMAT, "source": str(directory)}
    return base_model, diff


def import_peft_hf_to_file(base_model: nn.Module, directory: str | os.PathLike, out: str | os.PathLike,
                           verify: bool = True, tolerance: float = 1e-4) -> tuple[Path, float | None]:
    """`import_peft_hf_dir` then `save_adapter` (metadata `extra` names the source directory)."""
    from .io import save_adapter

    model, diff = import_peft_hf_dir(base_model, directory, verify=verify, tolerance=tolerance)
    extra = {"imported_from": str(directory), "source_format": SOURCE_FORMAT}
    if diff is not None:
        extra["probe_max_abs_diff"] = diff
    return save_adapter(model, out, extra_metadata=extra), diff


__all__ = ["export_peft_hf_dir", "import_peft_hf_dir", "import_peft_hf_to_file", "looks_like_hf_sam_peft",
           "read_peft_dir", "plan_hf_import", "probe_difference"]
