"""Semantic adapter files: the encoder's PEFT tensors plus the semantic head, in one `.safetensors`.

Same container, metadata and base check as interactive adapters (`io.py`), with:
- `format_version` 2 (a reader of version 1 refuses the file as "newer" instead of mis-loading it);
- metadata `task` = "semantic" and `semantic` = JSON {kind, num_classes, class_names, head_options, joint};
- tensor keys: the encoder side exactly as in interactive files (`image_encoder.blocks.3.attn.qkv.q.lora_A.weight`,
  trained SAM parts under their official keys), the head under `head.*`.

Loading checks, each with one error naming the file: the task (an interactive file here, or this file
given to the interactive `load_adapter`, is refused), the architecture and base weights (`check_base`),
and, when the caller has a class table (a manifest to evaluate, a label table to predict with), that the
head was trained for exactly those classes in that order.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MedicoPeftError
from ..tuners import is_injected, peft_state, unload
from ..tuners.semantic import inject_semantic, semantic_trainable_tensors
from ..utils.atomic import atomic_path
from ..utils.state import describe_mismatch
from .format import build_metadata, file_key

TASK_SEMANTIC = "semantic"
SEMANTIC_FORMAT_VERSION = 2
_SAM_PREFIX = "sam."


def semantic_file_key(name: str) -> str:
    """`SemanticSam` parameter name -> file key (`sam.` dropped, peft adapter name dropped; `head.*` kept)."""
    if name.startswith(_SAM_PREFIX):
        return file_key(name[len(_SAM_PREFIX):])
    return file_key(name)


def semantic_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {semantic_file_key(n): p.detach().cpu().contiguous().clone()
            for n, p in semantic_trainable_tensors(model).items()}


def save_semantic_adapter(model: nn.Module, path: str | os.PathLike, joint: bool = False,
                          extra_metadata: dict | None = None) -> Path:
    """Write a `SemanticSam`'s trained tensors (PEFT + head) and the metadata needed to rebuild it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: adapter files are .safetensors; use a name ending in .safetensors")
    sam = model.sam
    if not is_injected(sam):
        raise AdapterError("save_semantic_adapter: the model has no PEFT config; call "
                           "medico_peft.tuners.semantic.inject_semantic(model, cfg) first")
    if sam.base_sha256 is None:
        raise AdapterError("save_semantic_adapter: the model has no base_sha256; load it with "
                           "medico_peft.models.load_model")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metadata = build_metadata(sam, peft_state(sam).config, extra_metadata, created)
    metadata["format_version"] = str(SEMANTIC_FORMAT_VERSION)
    metadata["task"] = TASK_SEMANTIC
    metadata["semantic"] = json.dumps({**model.describe(), "joint": bool(joint)}, sort_keys=True)
    tensors = semantic_tensors(model)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def semantic_metadata(meta: dict, path) -> dict:
    """The parsed `semantic` metadata of a semantic adapter file; AdapterError for any other file."""
    if meta.get("task", "interactive") != TASK_SEMANTIC:
        raise AdapterError(f"{path}: an interactive adapter (no semantic head); it cannot be used for semantic "
                           "segmentation: train one with 'task: semantic' (medico-peft train) or use interactive "
                           "prediction")
    try:
        info = json.loads(meta.get("semantic", ""))
    except json.JSONDecodeError:
        raise AdapterError(f"{path}: metadata 'semantic' is not valid JSON") from None
    if not isinstance(info, dict):
        raise AdapterError(f"{path}: metadata 'semantic' should be a JSON object")
    names = info.get("class_names")
    n = info.get("num_classes")
    if info.get("kind") not in ("unetr", "samed"):
        raise AdapterError(f"{path}: metadata 'semantic.kind' is {info.get('kind')!r}, expected 'unetr' or 'samed'")
    if not isinstance(n, int) or not isinstance(names, list) or len(names) != n or n < 2:
        raise AdapterError(f"{path}: metadata 'semantic' should hold num_classes >= 2 and as many class_names, "
                           f"got num_classes={n!r}, class_names={names!r}")
    return info


def check_class_table(info: dict, class_names, path, source: str = "the class table") -> None:
    """The head's classes (`info` from `semantic_metadata`, or a SemanticSam's `describe()`) must equal
    `class_names` (background first), same count and order."""
    mine = list(info["class_names"])
    theirs = list(class_names)
    if mine == theirs:
        return
    if len(mine) != len(theirs):
        detail = f"it predicts {len(mine)} classes {mine}, {source} has {len(theirs)}: {theirs}"
    else:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        i, a, b = diff[0]
        detail = f"class {i} is {a!r} in the head but {b!r} in {source} (heads: {mine}; table: {theirs})"
    raise AdapterError(f"{path}: the semantic head does not match {source}: {detail}; use the class "
                       "selection it was trained with (semantic.classes/merge/rename) or train a new head")


def load_semantic_adapter(sam: nn.Module, path: str | os.PathLike, force: bool = False,
                          class_names=None, class_source: str = "the class table") -> nn.Module:
    """A `SemanticSam` around `sam` (changed in place: the file's PEFT injected) with the file's head.

    `class_names` (background first), when given, must equal the head's classes. A refused load
    leaves `sam` as it was.
    """
    from ..models.semantic import build_semantic
    from .io import check_base, read_adapter, restore_base_parts, snapshot_base_parts

    meta, tensors = read_adapter(path)
    info = semantic_metadata(meta, path)
    if class_names is not None:
        check_class_table(info, class_names, path, class_source)
    if is_injected(sam):
        raise AdapterError(f"{path}: the model already has an adapter; load onto a plain base model")
    check_base(meta, sam, path, force)
    saved = snapshot_base_parts(sam)
    try:
        opts = info.get("head_options") or {}
        model = build_semantic(sam, info["kind"], info["num_classes"], info["class_names"],
                               channels=opts.get("channels"))
        inject_semantic(model, meta["config"], joint=bool(info.get("joint", False)))
        params = {semantic_file_key(n): p for n, p in semantic_trainable_tensors(model).items()}
        problem = describe_mismatch(tensors, params)
        if problem:
            raise AdapterError(f"{path}: adapter tensors do not match its config and head: {problem}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(param.dtype))
    except (MedicoPeftError, ConfigError) as exc:
        if is_injected(sam):
            unload(sam)
        restore_base_parts(sam, saved)
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"{path}: {exc}") from None
    model.to(next(sam.parameters()).device)
    model.adapter_metadata = {k: v for k, v in meta.items() if k != "config"}
    sam.adapter_metadata = model.adapter_metadata
    return model
