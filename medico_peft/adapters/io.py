"""Save, load and inspect adapter files (see `format.py` for the layout).

Loading is strict: the file must be ours, not from a newer format, made for this architecture
and (unless `force`) for these exact base weights, and its keys must be exactly the tensors
the recorded config trains. A refused load leaves the base model as it was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MedicoPeftError
from ..tuners import PeftConfig, inject, is_injected, peft_state, trainable_state_dict, unload
from ..tuners.lora.init import converted_state, needs_conversion
from ..utils.atomic import atomic_path
from ..utils.hashing import sha256_state_dict
from ..utils.state import describe_mismatch
from .format import FORMAT_NAME, READ_VERSION, build_metadata, file_key

_ARCH_FIELDS = ("name", "family", "encoder", "prompt_dim", "decoder_mlp_dim", "decoder_heads")


# --- writing -------------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under their file keys (detached CPU copies)."""
    return {file_key(n): p.detach().cpu().contiguous().clone() for n, p in trainable_state_dict(model).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
    """Write only what was trained (PEFT tensors + trained SAM parts) and the metadata needed to reload it.

    A PiSSA/OLoRA model is written as its plain-LoRA equivalent on the original base (`tuners.lora.init`):
    the file's config has rank 2r and init default; `extra.lora_init` records the original init, rank, alpha.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: adapter files are .safetensors; use a name ending in .safetensors")
    if not is_injected(model):
        raise AdapterError("save_adapter: the model has no PEFT config; call medico_peft.tuners.inject(model, cfg) first")
    if model.base_sha256 is None:
        raise AdapterError("save_adapter: the model has no base_sha256; load it with medico_peft.models.load_model")
    cfg = peft_state(model).config
    if needs_conversion(model):
        # PiSSA/OLoRA: the model's base holds residuals; the file is the equivalent plain rank-2r LoRA on the
        # original base (whose sha256 it records), so it loads, merges and exports like any LoRA file.
        cfg, named = converted_state(model)
        tensors = {file_key(n): t.contiguous() for n, t in named.items()}
        extra_metadata = dict(extra_metadata or {})
        extra_metadata["lora_init"] = {"init": peft_state(model).config.init, "rank": peft_state(model).config.rank,
                                       "alpha": peft_state(model).config.alpha,
                                       "saved_as": "plain LoRA on the original base: rank 2r, [A ; A0], [B | -B0]"}
    else:
        tensors = adapter_tensors(model)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metadata = build_metadata(model, cfg, extra_metadata, created)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# --- reading -------------------------------------------------------------------------------------

def read_safetensors(path, expected: str) -> tuple[dict, dict]:
    """(string metadata, tensors) of a safetensors file; one AdapterError naming the file and `expected`
    for anything safetensors cannot read (it raises several types for truncated or garbled files)."""
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
        return raw, load_file(str(path))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise AdapterError(f"{path}: not a readable safetensors file, truncated or corrupt, expected {expected} "
                           f"({type(exc).__name__}: {detail})") from None

def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(parsed metadata, tensors) of an adapter file; AdapterError for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    raw, tensors = read_safetensors(path, "a medico_peft adapter")
    return parse_metadata(raw, path), tensors


def parse_metadata(raw: dict, path) -> dict:
    if raw.get("format") != FORMAT_NAME:
        raise AdapterError(f"{path}: not a medico_peft adapter file (metadata 'format' is {raw.get('format')!r}, "
                           f"expected {FORMAT_NAME!r})")
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise AdapterError(f"{path}: metadata 'format_version' must be an integer, "
                           f"got {raw.get('format_version')!r}") from None
    if version > READ_VERSION:
        raise AdapterError(f"{path}: adapter format version {version} is newer than this medico_peft "
                           f"(reads up to version {READ_VERSION}); upgrade medico_peft to load it")
    meta = dict(raw)
    meta["format_version"] = version
    for key in ("config", "base_spec", "extra"):
        try:
            meta[key] = json.loads(raw.get(key, "{}" if key == "extra" else ""))
        except json.JSONDecodeError:
            raise AdapterError(f"{path}: metadata {key!r} is not valid JSON") from None
        if not isinstance(meta[key], dict):
            raise AdapterError(f"{path}: metadata {key!r} should be a JSON object, got {type(meta[key]).__name__}")
    try:
        meta["config"] = PeftConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise AdapterError(f"{path}: metadata 'config' is invalid: {exc}") from None
    return meta


def base_state_sha256(model: nn.Module) -> str:
    """The state sha256 (`utils.hashing.sha256_state_dict`) of the weights the plain model holds now.

    Computed from the tensors at call time, never from `model.base_sha256` (the hash recorded when the
    weights were loaded, which in-place changes — `load_state_dict`, a decoder trained in place, an
    `unload` that keeps trained decoder weights — leave stale). vit_h takes a few seconds on CPU
    (benchmarks/results/hash.md).
    """
    if is_injected(model):
        raise AdapterError("base_state_sha256: the model has an adapter; its base weights are hashed on the "
                           "plain model (unload it, or use AdapterBank, which does)")
    return sha256_state_dict(model.state_dict())


def require_interactive(meta: dict, path) -> None:
    """Refuse a semantic adapter (`task` semantic: a class head, adapters/semantic.py) where an
    interactive one is needed."""
    if meta.get("task", "interactive") != "interactive":
        raise AdapterError(f"{path}: a {meta.get('task')} adapter (a class head for automatic segmentation); it "
                           "cannot be used for interactive (prompted) prediction: load it with "
                           "medico_peft.adapters.load_semantic_adapter or use the --semantic commands")


def check_base(meta: dict, model: nn.Module, path, force: bool = False) -> None:
    """Same architecture always; same base weights unless `force`.

    "Same base weights" compares the file's `base_sha256` with the state sha256 of the weights the
    model holds *now* (`base_state_sha256`). Files of every format version record that same hash,
    so old files are checked the same way.
    """
    spec = meta["base_spec"]
    mine = model.spec.to_dict()
    diff = [f for f in _ARCH_FIELDS if spec.get(f) != mine.get(f)]
    if diff:
        raise AdapterError(f"{path}: adapter was made for a {spec.get('name')} base, this model is a "
                           f"{model.spec.name} (differs in {', '.join(diff)})")
    if force:
        return
    theirs = meta.get("base_sha256")
    ours = base_state_sha256(model)
    if theirs != ours:
        recorded = getattr(model, "base_sha256", None)
        changed = (f" (its weights changed in place after they were loaded with sha256 {recorded})"
                   if recorded and recorded != ours else "")
        trained_on = f"base weights sha256 {theirs}" if theirs else "base weights it records no sha256 for"
        raise AdapterError(f"{path}: adapter was trained on {trained_on}, but this base has sha256 {ours}{changed}; "
                           "load the matching base or pass force=True (--force) to apply it anyway")


def apply_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy file tensors into the model's trained parameters; keys and shapes must match exactly."""
    params = {file_key(n): p for n, p in trainable_state_dict(model).items()}
    problem = describe_mismatch(tensors, params)
    if problem:
        raise AdapterError(f"{path}: adapter tensors do not match its config: {problem}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))


def load_adapter(base_model: nn.Module, path: str | os.PathLike, force: bool = False,
                 name: str = "default") -> nn.Module:
    """Inject the file's config into `base_model` (in place) and load its tensors; returns the model."""
    meta, tensors = read_adapter(path)
    require_interactive(meta, path)
    if is_injected(base_model):
        raise AdapterError(f"{path}: the model already has an adapter; load onto a plain base model "
                           "(or use AdapterBank to switch between several)")
    check_base(meta, base_model, path, force)
    inject_and_apply(base_model, meta["config"], tensors, path, adapter_name=name)
    base_model.adapter_metadata = {k: v for k, v in meta.items() if k != "config"}
    return base_model


def snapshot_base_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every weight outside the image encoder: the parts an adapter may train in place.

    `unload` removes PEFT modules but cannot revert a decoder or prompt encoder trained in place;
    this snapshot is what `restore_base_parts` puts back.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}


def restore_base_parts(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy a `snapshot_base_parts` back; keys the model lacks are skipped (a decoder Linear under LoRA
    lives at `...base_layer.*`, frozen and untouched)."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in saved.items():
            if key in state:
                state[key].copy_(value)


def inject_and_apply(model: nn.Module, cfg: PeftConfig, tensors: dict[str, torch.Tensor], path,
                     adapter_name: str = "default") -> None:
    """Inject `cfg` and load `tensors` into it; on failure the model is left as it was (then re-raise)."""
    saved = snapshot_base_parts(model)
    try:
        inject(model, cfg, adapter_name=adapter_name)
        apply_tensors(model, tensors, path)
    except MedicoPeftError:
        if is_injected(model):
            unload(model)
        restore_base_parts(model, saved)
        raise


def inspect_adapter(path: str | os.PathLike) -> dict:
    """Metadata and tensor summary of an adapter file (for `medico-peft adapter inspect`)."""
    meta, tensors = read_adapter(path)
    groups: dict[str, int] = {}
    for key, t in tensors.items():
        part = key.split(".", 1)[0]
        groups[part] = groups.get(part, 0) + t.numel()
    spec = meta["base_spec"]
    task = {"task": meta.get("task", "interactive")}
    if task["task"] == "semantic":
        from .semantic import semantic_metadata

        info = semantic_metadata(meta, path)
        task.update({"head": info["kind"], "num_classes": info["num_classes"], "classes": info["class_names"],
                     "joint": bool(info.get("joint", False))})
    return {
        "path": str(path),
        "size_bytes": Path(path).stat().st_size,
        "format_version": meta["format_version"],
        "method": meta["config"].method,
        **task,
        "config": meta["config"].to_dict(),
        "base_model": spec.get("name"),
        "base_img_size": spec.get("img_size"),
        "base_sha256": meta.get("base_sha256"),
        "library_version": meta.get("library_version"),
        "created": meta.get("created"),
        "extra": meta.get("extra", {}),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "parameters_by_submodule": groups,
    }
