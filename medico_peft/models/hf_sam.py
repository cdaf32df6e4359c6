"""HF transformers' `SamModel` <-> official segment_anything / `MedSam`: key map, config, checkpoint folders.

`transformers.SamModel` is the same network as official SAM's ViT models under other names
(`image_encoder.blocks.N.norm1` -> `vision_encoder.layers.N.layer_norm1`, `neck.0` -> `neck.conv1`,
`pe_layer.positional_encoding_gaussian_matrix` -> `shared_image_embedding.positional_embedding`, the
decoder MLPs' `layers.0/1/2` -> `proj_in/layers.0/proj_out`, ...). The map below is written as rules on
official keys; its inverse is built over a model's actual key set, so both directions are exact and any
key outside the rules is refused by name. Only the ViT family exists in transformers: LiteMedSAM's TinyViT
has no `SamModel` counterpart.

Two numerical details, checked in tests/test_interop_transformers.py:
- official SAM's two-way-transformer LayerNorms use eps 1e-5, transformers' `mask_decoder_config.layer_norm_eps`
  defaults to 1e-6 (also in published HF SAM configs); the configs written here set 1e-5, so the converted
  model computes exactly what ours does. Folders with 1e-6 still load (the difference is below 1e-5 relative).
- `SamModel` takes `pixel_values` already normalised; `MedSam.encode` takes [0, 1] images and normalises with
  the SAM pixel statistics itself (`MedSam.normalize`), which is what transformers' image processor does.

Reading a folder needs only `safetensors` and `json`; writing one needs `transformers` (for `SamConfig`'s
own `config.json`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .specs import SPECS, ModelSpec

HF_MODEL_TYPE = "sam"
HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"
# transformers ties this parameter to `shared_image_embedding.positional_embedding` (one tensor, two names).
HF_TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"
HF_POS_KEY = "shared_image_embedding.positional_embedding"
# official SAM's TwoWayTransformer LayerNorms (torch default eps); see the module docstring.
DECODER_LAYER_NORM_EPS = 1e-5

NO_TINYVIT = ("transformers has no TinyViT SAM: `SamModel`'s vision encoder is the ViT of vit_b/l/h, so "
              "LiteMedSAM (TinyViT) weights and adapters cannot be expressed for it")

_MLP3 = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)"
_DEC_ATTN = r"(layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)|final_attn_token_to_image)"

# (regex matched at the start of an official key, replacement); the rest of the key is kept as it is.
# A rule ending in `$` names a whole parameter.
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), r) for p, r in [
    (r"image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.", r"vision_encoder.layers.\1.attn.\2."),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_[hw])$", r"vision_encoder.layers.\1.attn.\2"),
    (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.", r"vision_encoder.layers.\1.mlp.\2."),
    (r"image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", HF_POS_KEY),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.", r"prompt_encoder.point_embed.\1."),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.", r"prompt_encoder.\1."),
    (r"prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"mask_decoder\.transformer\." + _DEC_ATTN + r"\.(q_proj|k_proj|v_proj|out_proj)\.",
     r"mask_decoder.transformer.\1.\2."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.", r"mask_decoder.transformer.layers.\1.mlp.\2."),
    (r"mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"mask_decoder\." + _MLP3 + r"\.layers\.0\.", r"mask_decoder.\1.proj_in."),
    (r"mask_decoder\." + _MLP3 + r"\.layers\.1\.", r"mask_decoder.\1.layers.0."),
    (r"mask_decoder\." + _MLP3 + r"\.layers\.2\.", r"mask_decoder.\1.proj_out."),
]]


def official_to_hf_key(key: str) -> str:
    """One official SAM / MedSam state-dict key -> its `transformers.SamModel` key; CheckpointError if unknown."""
    for pattern, repl in _RULES:
        m = pattern.match(key)
        if m:
            return m.expand(repl) + key[m.end():]
    if key.startswith("image_encoder.") and not key.startswith(("image_encoder.blocks.", "image_encoder.neck.")):
        raise CheckpointError(f"{key}: not a ViT image-encoder key; {NO_TINYVIT}")
    raise CheckpointError(f"{key}: no transformers.SamModel counterpart (the map covers SAM's ViT image encoder, "
                          "prompt encoder and mask decoder)")


def hf_key_map(official_keys) -> dict[str, str]:
    """{official key: HF key} over a key set (e.g. `model.state_dict()`); refuses collisions and unknown keys."""
    out = {k: official_to_hf_key(k) for k in official_keys}
    if len(set(out.values())) != len(out):
        raise CheckpointError("official -> transformers key map is not one-to-one over these keys")
    return out


def hf_module_name(module: str, official_keys) -> str:
    """Official module path (e.g. `image_encoder.blocks.3.attn.qkv`) -> its HF path, via the module's `.weight`."""
    key = module + ".weight"
    if key not in set(official_keys):
        raise CheckpointError(f"{module}: no such module with a weight in this model")
    return official_to_hf_key(key)[: -len(".weight")]


def official_module_names(official_keys) -> dict[str, str]:
    """{HF module path: official module path} for every module of this key set that has a `.weight`."""
    return {hf[: -len(".weight")]: off[: -len(".weight")]
            for off, hf in hf_key_map(official_keys).items() if off.endswith(".weight")}


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official/MedSam state dict -> `SamModel` state dict (the tied positional-embedding key written once, as
    `SamModel.save_pretrained` does)."""
    return {hf: state[off] for off, hf in hf_key_map(state).items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], official_keys, source: str = "<state dict>") -> dict:
    """`SamModel` state dict -> official keys (exactly `official_keys`, e.g. a built MedSam's); refuses missing
    and unexpected keys by name. The tied key, if present, must equal `shared_image_embedding`'s."""
    mapping = hf_key_map(official_keys)
    hf_state = dict(hf_state)
    tied = hf_state.pop(HF_TIED_KEY, None)
    if tied is not None and HF_POS_KEY in hf_state and not torch.equal(tied, hf_state[HF_POS_KEY]):
        raise CheckpointError(f"{source}: {HF_TIED_KEY} differs from {HF_POS_KEY}; transformers ties them, "
                              "so the file is inconsistent")
    if tied is not None and HF_POS_KEY not in hf_state:
        hf_state[HF_POS_KEY] = tied
    wanted = set(mapping.values())
    missing = sorted(wanted - set(hf_state))
    extra = sorted(set(hf_state) - wanted)
    if missing or extra:
        parts = ([f"missing {len(missing)} keys (first: {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} unexpected keys (first: {extra[0]})"] if extra else [])
        raise CheckpointError(f"{source}: weights do not fit the SAM built from its config: " + "; ".join(parts))
    return {off: hf_state[hf] for off, hf in mapping.items()}


# --- configs ---------------------------------------------------------------------------------------
def hf_config_dict(spec: ModelSpec) -> dict:
    """Keyword arguments of `transformers.SamConfig` for a ViT `ModelSpec` (exact: decoder LayerNorm eps 1e-5)."""
    if spec.family != "vit":
        raise CheckpointError(f"{spec.name}: {NO_TINYVIT}")
    e = spec.encoder
    return {
        "vision_config": {
            "hidden_size": e["embed_dim"], "num_hidden_layers": e["depth"], "num_attention_heads": e["num_heads"],
            "image_size": spec.img_size, "patch_size": e["patch_size"], "window_size": e["window_size"],
            "global_attn_indexes": list(e["global_attn_indexes"]), "output_channels": spec.prompt_dim,
            "num_pos_feats": spec.prompt_dim // 2, "mlp_dim": int(e["embed_dim"] * e["mlp_ratio"]),
            "mlp_ratio": e["mlp_ratio"], "layer_norm_eps": 1e-6, "qkv_bias": True, "use_abs_pos": True,
            "use_rel_pos": True, "hidden_act": "gelu", "num_channels": 3,
        },
        "prompt_encoder_config": {
            "hidden_size": spec.prompt_dim, "image_size": spec.img_size, "patch_size": e["patch_size"],
            "mask_input_channels": 16, "num_point_embeddings": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        },
        "mask_decoder_config": {
            "hidden_size": spec.prompt_dim, "mlp_dim": spec.decoder_mlp_dim, "num_attention_heads": spec.decoder_heads,
            "num_hidden_layers": 2, "attention_downsample_rate": 2, "num_multimask_outputs": 3, "iou_head_depth": 3,
            "iou_head_hidden_dim": spec.iou_hidden_dim, "hidden_act": "relu", "layer_norm_eps": DECODER_LAYER_NORM_EPS,
        },
    }


# fields a folder's config must have exactly these values for (else the network is not SAM's)
_FIXED = {
    "vision_config": {"patch_size": 16, "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True,
                      "hidden_act": "gelu", "num_channels": 3},
    "prompt_encoder_config": {"mask_input_channels": 16, "num_point_embeddings": 4, "hidden_act": "gelu"},
    "mask_decoder_config": {"num_hidden_layers": 2, "attention_downsample_rate": 2, "num_multimask_outputs": 3,
                            "iou_head_depth": 3, "hidden_act": "relu"},
}


def spec_from_hf_config(config: dict, source: str = "<config>") -> ModelSpec:
    """The `ModelSpec` of a transformers SAM `config.json` (model_type must be "sam"); refuses other models."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected a JSON object (a transformers config), got {type(config).__name__}")
    mtype = config.get("model_type")
    if mtype != HF_MODEL_TYPE:
        raise CheckpointError(f"{source}: config model_type is {mtype!r}, expected {HF_MODEL_TYPE!r} "
                              "(a transformers SamModel folder); this folder holds another kind of model")
    subs = {}
    for name, fixed in _FIXED.items():
        sub = config.get(name)
        if not isinstance(sub, dict):
            raise CheckpointError(f"{source}: {name} missing or not an object")
        for field, value in fixed.items():
            if field in sub and sub[field] != value:
                raise CheckpointError(f"{source}: {name}.{field} is {sub[field]!r}, SAM's ViT models use {value!r}")
        subs[name] = sub
    v, d = subs["vision_config"], subs["mask_decoder_config"]
    try:
        hidden, depth, heads = int(v["hidden_size"]), int(v["num_hidden_layers"]), int(v["num_attention_heads"])
        glob, window, img = list(v["global_attn_indexes"]), int(v["window_size"]), int(v["image_size"])
        prompt_dim, dec_mlp = int(v["output_channels"]), int(d["mlp_dim"])
        dec_heads, iou_hidden = int(d["num_attention_heads"]), int(d["iou_head_hidden_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: incomplete SAM config ({type(exc).__name__}: {exc})") from None
    for spec in SPECS.values():
        e = spec.encoder
        if (spec.family == "vit" and e["embed_dim"] == hidden and e["depth"] == depth and e["num_heads"] == heads
                and list(e["global_attn_indexes"]) == glob and e["window_size"] == window
                and spec.prompt_dim == prompt_dim and spec.decoder_mlp_dim == dec_mlp
                and spec.decoder_heads == dec_heads and spec.iou_hidden_dim == iou_hidden):
            return spec if img == spec.img_size else spec.with_img_size(img)
    raise CheckpointError(f"{source}: SAM with hidden_size={hidden}, num_hidden_layers={depth}, "
                          f"num_attention_heads={heads} matches no known model ({', '.join(SPECS)})")


# --- folders ---------------------------------------------------------------------------------------
def read_hf_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / HF_CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder (expected a transformers SamModel folder)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a transformers model folder holds {HF_CONFIG_NAME}")
    try:
        return json.loads(path.read_text())
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__})") from None


def read_hf_folder(directory: str | os.PathLike) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(spec, official-key state dict) of a `SamModel.save_pretrained` folder (safetensors, one file or shards)."""
    from safetensors.torch import load_file

    from .build import build_from_spec

    directory = Path(directory)
    spec = spec_from_hf_config(read_hf_config(directory), str(directory / HF_CONFIG_NAME))
    if (directory / HF_WEIGHTS_NAME).is_file():
        files = [directory / HF_WEIGHTS_NAME]
    elif (directory / HF_INDEX_NAME).is_file():
        try:
            index = json.loads((directory / HF_INDEX_NAME).read_text())
            files = [directory / f for f in sorted(set(index["weight_map"].values()))]
        except Exception as exc:
            raise CheckpointError(f"{directory / HF_INDEX_NAME}: not a safetensors index ({type(exc).__name__})") from None
    else:
        raise CheckpointError(f"{directory}: no {HF_WEIGHTS_NAME} (or {HF_INDEX_NAME}); save the model with "
                              "safetensors (transformers' default)")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf_state.update(load_file(str(f)))
        except Exception as exc:
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]})") from None
    official_keys = build_from_spec(spec).state_dict().keys()
    return spec, from_hf_state_dict(hf_state, official_keys, str(directory))


def load_hf_folder(directory: str | os.PathLike):
    """A `MedSam` with the weights of a transformers SamModel folder (base sha256 recorded like `load_model`)."""
    from ..utils.hashing import sha256_state_dict
    from .build import build_from_spec
    from .checkpoints import load_state_into

    spec, state = read_hf_folder(directory)
    model = build_from_spec(spec)
    load_state_into(model, state, str(directory))
    model.base_source = str(directory)
    model.base_sha256 = sha256_state_dict(model.state_dict())
    return model.eval()


def hf_sam_config(spec: ModelSpec):
    """A `transformers.SamConfig` for `spec` (imports transformers)."""
    try:
        from transformers import SamConfig
    except ImportError:
        raise CheckpointError("writing a transformers SamModel folder needs the `transformers` package "
                              "(installed with peft, which depends on it)") from None
    return SamConfig(**hf_config_dict(spec))


def write_hf_folder(model, directory: str | os.PathLike) -> Path:
    """Write `model` (a plain MedSam) into `directory` as `config.json` + `model.safetensors`, the files
    `SamModel.save_pretrained` writes and `SamModel.from_pretrained` reads. `directory` must be empty/new;
    the files are written atomically one by one (weights first, config last)."""
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_path, atomic_write_text

    if getattr(model, "medico_peft", None) is not None:
        raise CheckpointError("write_hf_folder: the model has an adapter; merge it first (adapter merge)")
    config = hf_sam_config(model.spec)
    config.architectures = ["SamModel"]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / HF_WEIGHTS_NAME) as tmp:
        save_file(hf_state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / HF_CONFIG_NAME, config.to_json_string(use_diff=False))
    return directory
