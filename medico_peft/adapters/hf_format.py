"""HF peft's own directory format: `adapter_config.json` + `adapter_model.safetensors`.

Only the LoRA family can be expressed (peft has no bottleneck adapters). Trained SAM parts go in
`modules_to_save`, as peft does. The module names refer to the injected `MedSam`, in which a
targeted fused qkv is split into `qkv.q/.k/.v`; peft's `PeftModel.from_pretrained` therefore loads
the directory onto a MedSam whose qkv were split with `medico_peft.tuners.qkv_split.split_qkv`.
Our config, base spec and base hash ride along in the safetensors metadata so `import_peft_dir`
can check the base exactly like `load_adapter` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..errors import AdapterError, ConfigError
from ..tuners import PeftConfig, is_injected, peft_state
from ..utils.atomic import atomic_path, atomic_write_text
from .io import adapter_tensors, check_base, inject_and_apply, read_safetensors

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _json_default(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def export_peft_dir(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's LoRA/DoRA adapter as a peft directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not is_injected(model):
        raise AdapterError("export_peft_dir: the model has no PEFT config; inject or load an adapter first")
    state = peft_state(model)
    cfg: PeftConfig = state.config
    if not cfg.uses_lora or cfg.method == "adapter":
        raise AdapterError(f"export_peft_dir: method {cfg.method!r} cannot be written in peft's format "
                           "(only lora/dora, or decoder_lora, are peft methods)")
    config = state.lora_config.to_dict()
    modules_to_save = []
    if cfg.train_decoder and not cfg.decoder_lora:
        modules_to_save.append("mask_decoder")
    if cfg.train_prompt_encoder:
        modules_to_save.append("prompt_encoder")
    config["modules_to_save"] = modules_to_save or None
    tensors = {PREFIX + k: v for k, v in adapter_tensors(model).items()}
    metadata = {"format": "pt", "medico_peft.config": json.dumps(cfg.to_dict(), sort_keys=True),
                "medico_peft.base_spec": json.dumps(model.spec.to_dict(), sort_keys=True),
                "medico_peft.base_sha256": str(model.base_sha256)}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=_json_default))
    return directory


def import_peft_dir(base_model: nn.Module, directory: str | os.PathLike, force: bool = False) -> nn.Module:
    """Load a directory written by `export_peft_dir` onto a plain base model (in place)."""
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
    if "medico_peft.config" not in raw:
        raise AdapterError(f"{weights}: no 'medico_peft.config' metadata; only directories written by "
                           "export_peft_dir can be imported (their module names refer to the split qkv)")
    try:
        config_data = json.loads(raw["medico_peft.config"])
        meta = {"base_spec": json.loads(raw["medico_peft.base_spec"]), "base_sha256": raw.get("medico_peft.base_sha256")}
        for key, value in (("medico_peft.config", config_data), ("medico_peft.base_spec", meta["base_spec"])):
            if not isinstance(value, dict):
                raise AdapterError(f"{weights}: metadata {key!r} should be a JSON object, got {type(value).__name__}")
        cfg = PeftConfig.from_dict(config_data)
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{weights}: invalid medico_peft metadata, expected what export_peft_dir writes "
                           f"({type(exc).__name__}: {exc})") from None
    if is_injected(base_model):
        raise AdapterError(f"{directory}: the model already has an adapter; import onto a plain base model")
    check_base(meta, base_model, weights, force)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{weights}: key {bad[0]!r} does not start with {PREFIX!r}")
    inject_and_apply(base_model, cfg, {k[len(PREFIX):]: v for k, v in tensors.items()}, weights)
    return base_model
