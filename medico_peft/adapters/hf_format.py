"""HF peft's own directory format: `adapter_config.json` + `adapter_model.safetensors`.

`export_peft_dir` writes module names of official `segment_anything` (and of LiteMedSAM's own TinyViT
for `litemedsam`): a q/k/v-selective LoRA/DoRA is written as its exact fused `attn.qkv` equivalent
(`peft_interop`), so `peft.PeftModel.from_pretrained(sam_model_registry[...](checkpoint=...), DIR)`
loads it without medico_peft and computes the same outputs. Trained SAM parts go in `modules_to_save`,
as peft does. Only the LoRA family can be expressed: peft has no bottleneck-adapter type.
Our config, base spec and base hash ride along in the safetensors metadata so `import_peft_dir`
can check the base exactly like `load_adapter` does.

`import_peft_dir` reads those directories back (un-fusing them exactly), older medico_peft directories
with split `qkv.q/.k/.v` names, and LoRA/DoRA directories that stock peft wrote for official SAM
(`peft_interop.map_foreign`). Every fused or foreign directory is checked against stock peft's own
reading of it on a probe image before it is accepted (and before an export is committed).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

from torch import nn

from ..errors import AdapterError, ConfigError
from ..tuners import PeftConfig, is_injected, peft_state, unload
from ..tuners.lora.init import needs_conversion, to_plain_lora
from ..utils.atomic import atomic_path, atomic_write_text
from ..utils.paths import staged_folder
from .io import (adapter_tensors, check_base, inject_and_apply, read_safetensors, restore_base_parts,
                 snapshot_base_parts)
from .peft_interop import (QKV_PATTERN, apply_subset, check_against_stock_peft, check_targets_match, fuse_split_tensors,
                           fused_alpha, map_foreign, plain_copy_of, unfuse_tensors, split_parts)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LAYOUT_KEY = "medico_peft.layout"  # "fused" (official module names); absent in older, split-qkv directories
BUFFERS_KEY = "medico_peft.buffers"  # modules_to_save buffers written for peft; not trained, dropped on import
OWNED = (CONFIG_NAME, WEIGHTS_NAME, "README.md")


def _json_default(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def peft_directory_contents(model: nn.Module) -> tuple[dict, dict, dict]:
    """(peft adapter config dict, tensors under `base_model.model.` keys, safetensors metadata) for `model`."""
    if not is_injected(model):
        raise AdapterError("export_peft_dir: the model has no PEFT config; inject or load an adapter first")
    if needs_conversion(model):  # pissa/olora: export the plain LoRA on the original base (as the adapter file)
        model = to_plain_lora(copy.deepcopy(model))
    state = peft_state(model)
    cfg: PeftConfig = state.config
    if cfg.method == "adapter":
        raise AdapterError("export_peft_dir: method 'adapter' cannot be written in peft's format: bottleneck adapters "
                           "add modules (down/up projections) that peft has no adapter type for, so stock peft could "
                           "not rebuild them; merge is impossible too. Use lora/dora, or keep the medico_peft adapter "
                           "file")
    if not cfg.uses_lora:
        raise AdapterError(f"export_peft_dir: method {cfg.method!r} cannot be written in peft's format "
                           "(only lora/dora, or decoder_lora, are peft methods)")
    tensors, fused = fuse_split_tensors(model, adapter_tensors(model))
    names = sorted(k[:-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    config = state.lora_config.to_dict()
    config["init_lora_weights"] = True  # trained weights: how they were initialised does not matter to a loader
    config["target_modules"] = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    if fused:
        n = len(split_parts(cfg))
        if len(fused) == len(names):  # every adapted module is a fused qkv: one rank for all
            config["r"], config["lora_alpha"] = n * cfg.rank, fused_alpha(cfg, n)
        else:
            config["rank_pattern"] = {QKV_PATTERN: n * cfg.rank}
            config["alpha_pattern"] = {QKV_PATTERN: fused_alpha(cfg, n)}
    modules_to_save = []
    if cfg.train_decoder and not cfg.decoder_lora:
        modules_to_save.append("mask_decoder")
    if cfg.train_prompt_encoder:
        modules_to_save.append("prompt_encoder")
    config["modules_to_save"] = modules_to_save or None
    buffers = []  # peft saves (and loads) a modules_to_save module's whole state dict, buffers included
    for part in modules_to_save:
        params = {n for n, _ in model.get_submodule(part).named_parameters()}
        for key, value in model.get_submodule(part).state_dict().items():
            if key not in params:
                buffers.append(f"{part}.{key}")
                tensors[f"{part}.{key}"] = value.detach().cpu().contiguous().clone()
    config["base_model_name_or_path"] = None
    metadata = {"format": "pt", "medico_peft.config": json.dumps(cfg.to_dict(), sort_keys=True),
                "medico_peft.base_spec": json.dumps(model.spec.to_dict(), sort_keys=True),
                "medico_peft.base_sha256": str(model.base_sha256), LAYOUT_KEY: "fused",
                BUFFERS_KEY: json.dumps(sorted(buffers))}
    return config, {PREFIX + k: v for k, v in tensors.items()}, metadata


def export_peft_dir(model: nn.Module, directory: str | os.PathLike, tolerance: float = 1e-4) -> Path:
    """Write the model's LoRA/DoRA adapter as a peft directory with official SAM module names.

    The folder is staged and checked first: stock `peft.PeftModel.from_pretrained` loads it onto a plain
    copy of the base and must reproduce the model's outputs within `tolerance` (AdapterError otherwise);
    only then does it replace `directory` whole (other files a user keeps there survive).
    """
    from safetensors.torch import save_file

    config, tensors, metadata = peft_directory_contents(model)
    directory = Path(directory)
    with staged_folder(directory, owned=lambda name: name in OWNED) as stage:
        with atomic_path(stage / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        atomic_write_text(stage / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=_json_default))
        check_against_stock_peft(model, plain_copy_of(model), stage, tolerance)
    return directory


def read_peft_dir(directory: Path) -> tuple[dict, dict, dict]:
    """(adapter config dict, safetensors metadata, tensors with `base_model.model.` removed)."""
    config, raw, tensors = read_peft_folder(directory)
    weights = Path(directory) / WEIGHTS_NAME
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{weights}: key {bad[0]!r} does not start with {PREFIX!r}")
    return config, raw, {k[len(PREFIX):]: v for k, v in tensors.items()}


def read_peft_folder(directory) -> tuple[dict, dict, dict]:
    """(adapter config dict, safetensors metadata, tensors as stored) of a peft directory; one AdapterError
    naming the file when a part is missing or malformed."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for f in (weights, config_path):
        if not f.is_file():
            raise AdapterError(f"{f}: missing; a peft adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, OSError
        raise AdapterError(f"{config_path}: not valid JSON, expected peft's adapter config "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object (peft's adapter config), got {type(config).__name__}")
    raw, tensors = read_safetensors(weights, "peft adapter weights")
    return config, raw, tensors


def _our_metadata(raw: dict, weights) -> tuple[PeftConfig, dict]:
    try:
        config_data = json.loads(raw["medico_peft.config"])
        meta = {"base_spec": json.loads(raw["medico_peft.base_spec"]), "base_sha256": raw.get("medico_peft.base_sha256")}
        for key, value in (("medico_peft.config", config_data), ("medico_peft.base_spec", meta["base_spec"])):
            if not isinstance(value, dict):
                raise AdapterError(f"{weights}: metadata {key!r} should be a JSON object, got {type(value).__name__}")
        return PeftConfig.from_dict(config_data), meta
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{weights}: invalid medico_peft metadata, expected what export_peft_dir writes "
                           f"({type(exc).__name__}: {exc})") from None


def import_peft_dir(base_model: nn.Module, directory: str | os.PathLike, force: bool = False,
                    tolerance: float = 1e-3) -> nn.Module:
    """Load a peft LoRA/DoRA directory onto a plain base model (in place); returns the injected model.

    Directories from `export_peft_dir` are checked against their recorded base (sha256 unless `force`);
    foreign ones (stock peft on official SAM) record no base, so only the architecture (module names
    and shapes) is checked. Fused and foreign directories must then give stock peft's outputs within
    `tolerance` on a probe image. On any refusal the base model is left as it was.
    """
    directory = Path(directory)
    config, raw, tensors = read_peft_dir(directory)
    weights = directory / WEIGHTS_NAME
    if is_injected(base_model):
        raise AdapterError(f"{directory}: the model already has an adapter; import onto a plain base model")
    mapped = None
    if "medico_peft.config" in raw:
        cfg, meta = _our_metadata(raw, weights)
        check_base(meta, base_model, weights, force)
        for key in json.loads(raw.get(BUFFERS_KEY, "[]")):
            tensors.pop(key, None)
        if raw.get(LAYOUT_KEY) != "fused":  # written before the fused layout: split names only medico_peft has
            inject_and_apply(base_model, cfg, tensors, weights)
            return base_model
        mapped = unfuse_tensors(base_model, cfg, tensors)
    ours_exact = mapped is not None
    if mapped is None:  # foreign, or ours trained further in stock peft (no longer block-structured)
        from peft import LoraConfig

        try:
            lora_config = LoraConfig.from_pretrained(str(directory))
        except Exception as exc:  # peft raises TypeError/ValueError for configs it cannot read
            raise AdapterError(f"{directory / CONFIG_NAME}: not a peft LoRA config "
                               f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        check_targets_match(base_model, lora_config, directory / CONFIG_NAME)
        cfg, mapped = map_foreign(base_model, config, tensors, weights)
    plain = plain_copy_of(base_model)
    saved = snapshot_base_parts(base_model)
    if ours_exact:
        inject_and_apply(base_model, cfg, mapped, weights)  # every tensor the config trains, exactly
    else:
        apply_subset(base_model, cfg, mapped, weights)
    try:
        check_against_stock_peft(base_model, plain, directory, tolerance)
    except AdapterError:
        unload(base_model)
        restore_base_parts(base_model, saved)
        raise
    return base_model
